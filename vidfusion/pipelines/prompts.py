"""Prompts as A1111 / sd-webui-text2video users write them: emphasis `(word)`, `[word]`, `(word:1.3)`, escapes,
`BREAK`, and prompts longer than CLIP's 75 tokens, encoded in chunks of 75 (+ BOS/EOS) concatenated along the
token axis, as the webui does. A prompt without any of this that fits in 77 tokens takes the plain path: exactly
the embeddings `text_encoder.encode_text` gives.

Weights follow A1111's "original" mode: each chunk's hidden states times the token weights, then rescaled so
their mean is the unweighted one (computed in float32, per prompt, so batching never changes a video); "plain"
multiplies without the rescale.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..models.text_encoder import encode_text

PROMPT_SYNTAXES = ("a1111", "none")
WEIGHTINGS = ("original", "plain")
CHUNK = 75  # tokens of text per CLIP call (+ BOS and EOS)
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
ROUND_BRACKET, SQUARE_BRACKET = 1.1, 1 / 1.1

# A1111's modules/prompt_parser.py tokens: escapes, brackets, ":weight)" closers, text runs, a lone ":"
_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK = "BREAK"


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """(text, weight) runs of a prompt by A1111's rules: `(x)` x1.1, `[x]` /1.1, `(x:w)` xw, nesting multiplies,
    an unclosed bracket runs to the end, `\\(` `\\)` `\\[` `\\]` `\\\\` are literal, BREAK is ("BREAK", -1); runs of
    equal weight are merged."""
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(runs))
        elif token == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND_BRACKET)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE_BRACKET)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    runs.append([BREAK, -1])
                runs.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND_BRACKET)
    for start in square_open:
        multiply(start, SQUARE_BRACKET)
    if not runs:
        runs = [["", 1.0]]
    merged = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1] and run[1] != -1:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged]


def is_plain(tokenizer, text: str, syntax: str) -> bool:
    """No syntax to apply and short enough for one CLIP call: today's embeddings exactly."""
    if syntax == "a1111" and parse_prompt_attention(text) != [(text, 1.0)]:
        return False
    return len(tokenizer(text, add_special_tokens=False).input_ids) <= CHUNK


def token_chunks(tokenizer, text: str, syntax: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, weights), each (C, 77): the prompt's tokens in chunks of 75 between BOS and EOS, padded as the
    tokenizer pads; BREAK closes a chunk early."""
    runs = parse_prompt_attention(text) if syntax == "a1111" else [(text, 1.0)]
    comma = tokenizer(",", add_special_tokens=False).input_ids[-1:]
    chunks: list[list[tuple[int, float]]] = []
    chunk: list[tuple[int, float]] = []
    last_comma = -1
    for piece, weight in runs:  # A1111's tokenize_line, step for step
        if piece == "BREAK" and weight == -1:  # closes the chunk, even an empty one (a leading BREAK keeps it)
            chunks.append(chunk)
            chunk, last_comma = [], -1
            continue
        for token in tokenizer(piece, add_special_tokens=False).input_ids:
            if [token] == comma:
                last_comma = len(chunk)
            elif len(chunk) == CHUNK and last_comma != -1 and len(chunk) - last_comma <= COMMA_BACKTRACK:
                # a full chunk with a comma at most COMMA_BACKTRACK tokens back: the text after it moves on
                chunks.append(chunk[:last_comma + 1])
                chunk, last_comma = chunk[last_comma + 1:], -1
            if len(chunk) == CHUNK:
                chunks.append(chunk)
                chunk, last_comma = [], -1
            chunk.append((token, weight))
    if chunk or not chunks:
        chunks.append(chunk)
    length = tokenizer.model_max_length
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = torch.full((len(chunks), length), pad, dtype=torch.long)
    weights = torch.ones(len(chunks), length)
    for c, chunk in enumerate(chunks):
        row = [bos] + [t for t, _ in chunk] + [eos]
        ids[c, :len(row)] = torch.tensor(row)
        weights[c, 1:1 + len(chunk)] = torch.tensor([w for _, w in chunk])
    return ids, weights


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str], device: torch.device, clip_skip: int | None = None,
                   syntax: str = "a1111", weighting: str = "original") -> torch.Tensor:
    """Text states (N, 77 * C, D) for prompts in A1111 syntax (C chunks: the longest prompt's; shorter ones are
    padded with the empty prompt's chunk). Plain prompts give exactly `encode_text`'s (N, 77, D)."""
    if syntax not in PROMPT_SYNTAXES:
        raise ValueError(f"prompt_syntax must be one of {', '.join(PROMPT_SYNTAXES)}, got {syntax!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"prompt_weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    if all(is_plain(tokenizer, p, syntax) for p in prompts):
        return encode_text(text_encoder, tokenizer, prompts, device, clip_skip)
    states = []
    for prompt in prompts:  # one prompt at a time: its rescaling never depends on the batch
        ids, weights = token_chunks(tokenizer, prompt, syntax)
        z = _encode_ids(text_encoder, ids.to(device), clip_skip).float()  # (C, 77, D)
        weighted = z * weights.to(device)[..., None]
        if weighting == "original":  # A1111: keep each chunk's mean (a chunk whose weighted mean is 0 is kept as is)
            before, after = z.mean(dim=(1, 2), keepdim=True), weighted.mean(dim=(1, 2), keepdim=True)
            weighted = weighted * torch.where(after == 0, torch.ones_like(after), before / after)
        states.append(weighted.reshape(-1, z.shape[-1]))  # (77 * C, D)
    empty = encode_text(text_encoder, tokenizer, [""], device, clip_skip)[0].float()  # (77, D)
    return torch.stack(pad_tokens(states, empty)).to(text_encoder.dtype)


def pad_tokens(states: list[torch.Tensor], empty: torch.Tensor) -> list[torch.Tensor]:
    """Token-axis states (T_i, D) padded with whole empty-prompt chunks (77, D) to the longest."""
    longest = max(s.shape[0] for s in states)
    return [torch.cat([s, *[empty.to(s.dtype)] * ((longest - s.shape[0]) // empty.shape[0])]) for s in states]


def same_length(a: torch.Tensor, b: torch.Tensor, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of states (N, T, D) padded with empty-prompt chunks to one token length (cond and uncond)."""
    if a.shape[1] == b.shape[1]:
        return a, b
    longest = max(a.shape[1], b.shape[1])

    def pad(x: torch.Tensor) -> torch.Tensor:
        extra = empty.to(x.dtype).repeat((longest - x.shape[1]) // empty.shape[0], 1)  # (T', D)
        return torch.cat([x, extra.expand(x.shape[0], -1, -1)], dim=1)

    return pad(a), pad(b)


def _encode_ids(text_encoder, ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    if clip_skip is None:
        return text_encoder(ids)[0]
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden[-(clip_skip + 1)])


__all__ = ["encode_prompts", "parse_prompt_attention", "prompt_schedule", "same_length", "token_chunks"]


# ---- prompt editing and alternation: which text each denoising step sees ----------------------------------------

_NUMBER = re.compile(r"\s*([+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?)\s*$")  # lark's SIGNED_NUMBER


def prompt_schedule(text: str, steps: int) -> list[tuple[int, str]]:
    """A1111's prompt editing over `steps` denoising steps, as its `get_learned_conditioning_prompt_schedules`:
    [(end_at_step, text)]. Denoising step s (counted from 0, as A1111's denoiser counts) uses the first entry with
    s <= end_at_step. `[from:to:when]` uses `from` while s <= when and `to` after it, where `when` with a "." is a
    fraction of the steps (`[a:b:1.0]` never switches) and without one a step number (both truncated to an integer,
    at most `steps`); `[to:when]` adds `to` after `when`, `[from::when]` removes `from` after it; `[a|b|c]` takes
    option (s' - 1) mod 3 at schedule step s' (so a, a, b, a, b, ... over denoising steps 0, 1, 2, ...).
    Emphasis brackets stay in the text for parse_prompt_attention. Bad syntax: a clear error naming the position."""
    tree = _parse_sequence(text, 0, "")[0]
    texts = [_resolve(tree, step, steps) for step in range(1, steps + 1)]
    schedule: list[tuple[int, str]] = []
    for step, resolved in enumerate(texts, 1):
        if schedule and schedule[-1][1] == resolved:
            schedule[-1] = (step, resolved)
        else:
            schedule.append((step, resolved))
    return schedule


def _parse_sequence(text: str, i: int, closers: str) -> tuple[list, int]:
    """Nodes until one of `closers` at this depth: plain strings, ("group", open, nodes, close) for emphasis,
    ("edit", [parts], when) for scheduling, ("alt", [options]) for alternation."""
    nodes: list = []
    while i < len(text) and text[i] not in closers:
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            nodes.append(text[i:i + 2])
            i += 2
        elif char == "(":
            inner, j = _parse_sequence(text, i + 1, ")")
            close = ")" if j < len(text) else ""
            nodes.append(("group", "(", inner, close))
            i = j + 1
        elif char == "[":
            node, i = _parse_bracket(text, i)
            nodes.append(node)
        else:
            nodes.append(char)
            i += 1
    return nodes, i


def _parse_bracket(text: str, start: int) -> tuple[Any, int]:
    parts, separators, i = [], [], start + 1
    while True:
        part, i = _parse_sequence(text, i, ":|]")
        parts.append(part)
        if i >= len(text):
            if separators:
                raise ValueError(f"prompt: the '[' at position {start} starts a prompt edit or alternation that is "
                                 f"never closed; add ']' (or write '\\[' for a literal bracket): {text!r}")
            return ("group", "[", parts[0], ""), i
        if text[i] == "]":
            break
        separators.append(text[i])
        i += 1
    end = i + 1
    if "|" in separators:
        if ":" in separators:
            raise ValueError(f"prompt: '[' at position {start} mixes ':' and '|'; use [a|b] or [from:to:when]")
        return ("alt", parts), end
    if separators and len(parts) in (2, 3):
        when = _NUMBER.match("".join(p if isinstance(p, str) else "\0" for p in parts[-1]))
        if when:
            edit = parts[:-1] if len(parts) == 3 else [[], parts[0]]
            return ("edit", edit, when.group(1)), end
    # not an edit (e.g. "[less]" or "[a:b]"): emphasis brackets with their text, as A1111 reads them
    nodes = parts[0]
    for sep, part in zip(separators, parts[1:]):
        nodes = [*nodes, sep, *part]
    return ("group", "[", nodes, "]"), end


def _resolve(nodes: list, step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "group":
            out.append(node[1] + _resolve(node[2], step, steps) + node[3])
        elif node[0] == "alt":
            out.append(_resolve(node[1][(step - 1) % len(node[1])], step, steps))
        else:  # edit
            _, (before, after), when = node
            last = min(steps, int(float(when) * steps if "." in when else float(when)))
            out.append(_resolve(before if step <= last else after, step, steps))
    return "".join(out)
