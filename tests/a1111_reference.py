"""A transcription of AUTOMATIC1111's stable-diffusion-webui code that decides which text each denoising step sees
and how a prompt is cut into 75-token chunks: modules/prompt_parser.py (its lark grammar,
get_learned_conditioning_prompt_schedules without hires steps, reconstruct_cond_batch's pick) and
modules/sd_hijack_clip.py (tokenize_line with comma_padding_backtrack 20, no textual-inversion embeddings). Kept
close to the original's structure so a reader can check it line by line; the tests compare vidfusion with it."""

from __future__ import annotations

import lark

schedule_parser = lark.Lark(r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
""")


def get_learned_conditioning_prompt_schedules(prompts, base_steps):
    steps = base_steps
    int_offset, flt_offset = 0, 0

    def collect_steps(steps, tree):
        res = [steps]

        class CollectSteps(lark.Visitor):
            def scheduled(self, tree):
                s = tree.children[-2]
                v = float(s)
                if "." in s:
                    v = (v - flt_offset) * steps
                else:
                    v = (v - int_offset)
                tree.children[-2] = min(steps, int(v))
                if tree.children[-2] >= 1:
                    res.append(tree.children[-2])

            def alternate(self, tree):
                res.extend(range(1, steps + 1))

        CollectSteps().visit(tree)
        return sorted(set(res))

    def at_step(step, tree):
        class AtStep(lark.Transformer):
            def scheduled(self, args):
                before, after, _, when, _ = args
                yield before or () if step <= when else after

            def alternate(self, args):
                args = ["" if not arg else arg for arg in args]
                yield args[(step - 1) % len(args)]

            def start(self, args):
                def flatten(x):
                    if isinstance(x, str):
                        yield x
                    else:
                        for gen in x:
                            yield from flatten(gen)
                return "".join(flatten(args))

            def plain(self, args):
                yield args[0].value

            def __default__(self, data, children, meta):
                yield from children

        return AtStep().transform(tree)

    def get_schedule(prompt):
        try:
            tree = schedule_parser.parse(prompt)
        except lark.exceptions.LarkError:
            return [[steps, prompt]]
        return [[t, at_step(t, tree)] for t in collect_steps(steps, tree)]

    promptdict = {prompt: get_schedule(prompt) for prompt in set(prompts)}
    return [promptdict[prompt] for prompt in prompts]


def reconstruct_pick(cond_schedule, current_step):
    """reconstruct_cond_batch's choice for one prompt: the first entry whose end_at_step >= the denoiser's step
    (CFGDenoiser.step: 0 for the first model call)."""
    target_index = 0
    for current, (end_at_step, _) in enumerate(cond_schedule):
        if current_step <= end_at_step:
            target_index = current
            break
    return cond_schedule[target_index][1]


def tokenize_line(parsed, tokenize, comma_token, chunk_length=75, comma_padding_backtrack=20):
    """sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line after parse_prompt_attention: chunks of
    (tokens, multipliers), each chunk_length long between no BOS/EOS (the original adds them in next_chunk; left
    out here and compared without them), padded with None."""
    chunks = []
    chunk_tokens, chunk_multipliers = [], []
    last_comma = -1

    def next_chunk():
        nonlocal last_comma, chunk_tokens, chunk_multipliers
        to_add = chunk_length - len(chunk_tokens)
        if to_add > 0:
            chunk_tokens += [None] * to_add
            chunk_multipliers += [1.0] * to_add
        last_comma = -1
        chunks.append((chunk_tokens, chunk_multipliers))
        chunk_tokens, chunk_multipliers = [], []

    tokenized = [tokenize(text) for text, _ in parsed]
    for tokens, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma_token:
                last_comma = len(chunk_tokens)
            elif comma_padding_backtrack != 0 and len(chunk_tokens) == chunk_length and last_comma != -1 and \
                    len(chunk_tokens) - last_comma <= comma_padding_backtrack:
                break_location = last_comma + 1
                reloc_tokens = chunk_tokens[break_location:]
                reloc_mults = chunk_multipliers[break_location:]
                chunk_tokens = chunk_tokens[:break_location]
                chunk_multipliers = chunk_multipliers[:break_location]
                next_chunk()
                chunk_tokens = reloc_tokens
                chunk_multipliers = reloc_mults
            if len(chunk_tokens) == chunk_length:
                next_chunk()
            chunk_tokens.append(token)
            chunk_multipliers.append(weight)
            position += 1
    if chunk_tokens or not chunks:
        next_chunk()
    return chunks
