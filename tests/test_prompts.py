"""A1111 prompt syntax: the parser on A1111's own documented examples, weighted embeddings against a reference
written from the rules, long prompts in chunks, BREAK, and plain prompts unchanged."""

from __future__ import annotations

import pytest
import torch

from vidfusion.models.text_encoder import encode_text
from vidfusion.pipelines.prompts import encode_prompts, parse_prompt_attention, token_chunks

from .test_parity import assert_latents_close


@pytest.mark.parametrize("text, expected", [  # the examples in A1111's modules/prompt_parser.py
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("[less] and (neg:-0.5)", [("less", 1 / 1.1), (" and ", 1.0), ("neg", -0.5)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
])
def test_parser_follows_a1111(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_plain_prompts_give_todays_embeddings(ours):
    """Catches the syntax path changing every video: no syntax and <= 75 tokens is encode_text exactly."""
    prompts = ["a cat is surfing", "spiderman on a wave"]
    expected = encode_text(ours.text_encoder, ours.tokenizer, prompts, torch.device("cpu"))
    assert torch.equal(encode_prompts(ours.text_encoder, ours.tokenizer, prompts, torch.device("cpu")), expected)


def test_weighted_embeddings_match_the_rules(ours):
    """A1111 'original': hidden states times the token weights, rescaled to the unweighted mean; 'plain' without
    the rescale; prompt_syntax='none' takes the brackets literally."""
    te, tok, cpu = ours.text_encoder, ours.tokenizer, torch.device("cpu")
    text = "a (cat:1.5) is [surfing]"
    ids, weights = token_chunks(tok, text, "a1111")
    plain_ids = tok("a cat is surfing", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, plain_ids)  # the same tokens as the bracket-free text
    cat = tok("cat", add_special_tokens=False).input_ids
    surf = tok("surfing", add_special_tokens=False).input_ids
    expected_w = torch.ones(77)
    start = 1 + len(tok("a ", add_special_tokens=False).input_ids)
    expected_w[start:start + len(cat)] = 1.5
    s_start = start + len(cat) + len(tok(" is ", add_special_tokens=False).input_ids)
    expected_w[s_start:s_start + len(surf)] = 1 / 1.1
    assert torch.allclose(weights[0], expected_w)
    z = te(plain_ids)[0].float()  # reference: the rules written out
    weighted = z * expected_w[None, :, None]
    reference = weighted * (z.mean() / weighted.mean())
    assert torch.allclose(encode_prompts(te, tok, [text], cpu), reference, atol=1e-6)
    assert torch.allclose(encode_prompts(te, tok, [text], cpu, weighting="plain"), weighted, atol=1e-6)
    literal = encode_prompts(te, tok, [text], cpu, syntax="none")
    assert torch.equal(literal, encode_text(te, tok, [text], cpu))


def test_long_prompts_run_in_chunks_and_break_starts_one(ours):
    """Over 75 tokens: chunks of 75 (+ BOS/EOS) concatenated (catches truncation at 77); BREAK closes a chunk;
    cond and uncond padded to one length; the pipeline runs with them."""
    te, tok, cpu = ours.text_encoder, ours.tokenizer, torch.device("cpu")
    long = " ".join(["cat dog"] * 50)  # ~100 tokens
    ids, _ = token_chunks(tok, long, "a1111")
    assert ids.shape == (2, 77) and (ids[:, 0] == tok.bos_token_id).all()
    states = encode_prompts(te, tok, [long, "a cat"], cpu)
    assert states.shape == (2, 154, te.config.hidden_size)
    first = te(ids[:1])[0]
    assert torch.allclose(states[0, :77], first[0], atol=1e-6)
    empty = encode_text(te, tok, [""], cpu)[0]
    assert torch.allclose(states[1, 77:], empty, atol=1e-6)  # the short prompt padded with the empty chunk
    assert token_chunks(tok, "a cat BREAK a dog", "a1111")[0].shape[0] == 2
    out = ours(long, negative_prompt="blurry", num_frames=2, height=16, width=16, num_inference_steps=1,
               generator=torch.Generator().manual_seed(0), output_type="latent")
    assert out.frames.shape == (1, 4, 2, 8, 8)


def test_plain_prompt_video_unchanged_through_the_pipeline(ours, reference):
    """Syntax-free prompts keep diffusers' video (the parity of every other test holds by this path)."""
    args = dict(prompt="a cat is surfing", num_frames=2, height=16, width=16, num_inference_steps=2)
    ref = reference(generator=torch.Generator().manual_seed(0), output_type="latent", **args).frames
    got = ours(generator=torch.Generator().manual_seed(0), output_type="latent", **args).frames
    assert_latents_close(ref, got)


def test_prompt_schedule_follows_a1111():
    """A1111's own documented example (modules/prompt_parser.py), alternation, and a clear error."""
    from vidfusion.pipelines.prompts import prompt_schedule

    text = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
            "[ in background:0.25] [shoddy:masterful:0.5]")
    assert prompt_schedule(text, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful")]
    assert prompt_schedule("a [cat|dog]", 3) == [(1, "a cat"), (2, "a dog"), (3, "a cat")]
    assert prompt_schedule("a [dog:2] (x:1.2)", 4) == [(2, "a  (x:1.2)"), (4, "a dog (x:1.2)")]
    assert prompt_schedule("[less] and [a:b]", 4) == [(4, "[less] and [a:b]")]  # no edit: emphasis text
    with pytest.raises(ValueError, match="position 2"):
        prompt_schedule("a [b:c:0.5 oops", 4)


def _keys_seen(pipe, **kwargs) -> list[torch.Tensor]:
    """The first cross-attention keys of the conditional text at every UNet call."""
    seen = []

    def keep(module, args):
        context = args[2]
        first_keys = context[0][0] if isinstance(context, tuple) else pipe.unet.text_kv(context)[0][0]
        seen.append(first_keys[-1].clone())

    hook = pipe.unet.register_forward_pre_hook(keep)
    try:
        pipe(generator=torch.Generator().manual_seed(0), output_type="latent", num_frames=2, height=16, width=16,
             sampler="ddim", **kwargs)
    finally:
        hook.remove()
    return seen


def test_prompt_editing_switches_the_text_at_the_right_step(ours):
    """Catches editing ignored (one text for all steps) or switching a step early / late: the UNet sees 'a cat'
    for steps 1-2 of 4 and 'a dog' after, alternation flips every step, and each FreeInit pass starts over."""
    def keys(text):
        return ours.unet.text_kv(ours.encode_prompt([text], None, False))[0][0][-1]

    cat, dog = keys("a cat"), keys("a dog")
    seen = _keys_seen(ours, prompt="a [cat:dog:0.5]", num_inference_steps=4, guidance_scale=1.0)
    assert [torch.allclose(k, cat) for k in seen] == [True, True, True, False]  # A1111: switches after step when
    assert torch.allclose(seen[3], dog)
    seen = _keys_seen(ours, prompt="a [cat|dog]", num_inference_steps=4, guidance_scale=1.0)
    assert [torch.allclose(k, cat) for k in seen] == [True, True, False, True]  # A1111's a, a, b, a
    seen = _keys_seen(ours, prompt="a [cat:dog:0.5]", num_inference_steps=4, guidance_scale=7.0,
                      free_init_iterations=2, free_init_filter="gaussian")
    assert [torch.allclose(k, cat) for k in seen] == [True, True, True, False] * 2
    plain = ours("a cat", num_frames=2, height=16, width=16, num_inference_steps=2, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).frames
    same = ours("a [cat:dog:5]", num_frames=2, height=16, width=16, num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(0)).frames
    assert torch.equal(plain, same)  # an edit after the last step never happens


def test_prompt_editing_starts_at_the_runs_first_step(ours):
    """Catches the step counter starting at the schedule's first step in part-way runs: video-to-video at strength
    0.5 over 4 steps runs steps 2 and 3, both after `[cat:dog:1]` switched (a counter from 0 shows 'cat' first)."""
    from vidfusion import VideoToVideoPipeline

    def keys(text):
        return ours.unet.text_kv(ours.encode_prompt([text], None, False))[0][0][-1]

    v2v = VideoToVideoPipeline.from_pipe(ours)
    video = torch.rand(2, 16, 16, 3).numpy()
    seen = []
    hook = v2v.unet.register_forward_pre_hook(lambda m, args: seen.append(m.text_kv(args[2])[0][0][-1].clone()
                                                                           if not isinstance(args[2], tuple)
                                                                           else args[2][0][0][-1].clone()))
    try:
        v2v("a [cat:dog:1]", video=video, strength=0.5, num_inference_steps=4, guidance_scale=1.0, sampler="ddim",
            generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        hook.remove()
    assert len(seen) == 2 and all(torch.allclose(k, keys("a dog")) for k in seen)


WORDS = ["cat", "dog", "a red fox", "sky", "(tree:1.2)", "", "[less]"]
WHENS = ["0.25", "0.5", ".5", "1.0", "1.5", "2", "3", "0", "10", "0.99", "-1", "1e1"]


def _random_prompt(rng, depth: int = 0) -> str:
    kind = rng.choice(["word", "word", "edit", "add", "remove", "alt"] if depth < 2 else ["word"])
    if kind == "word":
        return rng.choice(WORDS[:-2] if depth else WORDS)
    a, b = _random_prompt(rng, depth + 1), _random_prompt(rng, depth + 1)
    when = rng.choice(WHENS)
    return {"edit": f"[{a}:{b}:{when}]", "add": f"[{a}:{when}]", "remove": f"[{a}::{when}]",
            "alt": "[" + "|".join([a, b, *([_random_prompt(rng, depth + 1)] if rng.random() < 0.3 else [])]) + "]",
            }[kind]


def test_prompt_schedules_match_a1111s_code():
    """Against a transcription of A1111's prompt_parser.py (its lark grammar, collect_steps / at_step, and
    reconstruct_cond_batch's pick at the denoiser's 0-based step) over 400 generated prompts and step counts:
    catches a switch one step early (a 1-based counter), `when` with a '.' read as a step number ([a:b:1.0]
    switching), `[a|b]` alternating b first, and steps beyond the last clamped differently."""
    import random

    from vidfusion.pipelines.generation import StepContexts
    from vidfusion.pipelines.prompts import prompt_schedule

    from .a1111_reference import get_learned_conditioning_prompt_schedules, reconstruct_pick

    rng = random.Random(0)
    for _ in range(400):
        text = " ".join(_random_prompt(rng) for _ in range(rng.randint(1, 3)))
        steps = rng.randint(1, 30)
        theirs = get_learned_conditioning_prompt_schedules([text], steps)[0]
        contexts = StepContexts(prompt_schedule(text, steps))
        for step in range(steps):
            contexts.step = step
            assert contexts.current == reconstruct_pick(theirs, step), (text, steps, step)


def test_long_prompts_chunk_as_a1111s_code(ours):
    """Against a transcription of A1111's tokenize_line over generated long prompts with commas and BREAKs: catches
    the empty chunk of a leading or doubled BREAK dropped, and a comma landing on the 76th token treated as a
    backtrack point (A1111 starts the next chunk with it)."""
    import random

    from .a1111_reference import tokenize_line

    tok = ours.tokenizer
    comma = tok(",", add_special_tokens=False).input_ids[-1]
    rng = random.Random(1)
    prompts = ["BREAK a cat", "a cat BREAK BREAK a dog", "a cat BREAK", ", ".join(["a b c d"] * 15) + ", x"]
    for _ in range(60):
        words = [rng.choice(["a", "cat", "dog", ",", "(red:1.3)", "BREAK", "sky"]) for _ in range(rng.randint(1, 200))]
        prompts.append(" ".join(words))
    for text in prompts:
        ids, weights = token_chunks(tok, text, "a1111")
        theirs = tokenize_line(parse_prompt_attention(text), lambda s: tok(s, add_special_tokens=False).input_ids,
                               comma)
        assert ids.shape[0] == len(theirs), text
        for row, (tokens, multipliers) in zip(range(ids.shape[0]), theirs):
            count = sum(t is not None for t in tokens)
            assert ids[row, 1:1 + count].tolist() == tokens[:count], text
            assert weights[row, 1:1 + count].tolist() == pytest.approx(multipliers[:count]), text


def test_original_weighting_never_makes_nan(ours):
    """The tiny checkpoint's final LayerNorm has bias 0, so an unweighted chunk's mean is 0: A1111's mean-preserving
    rescale divided 0 by 0 and every latent became NaN (a long prompt with BREAK in the middle)."""
    words = " ".join(["cat"] * 85).split()
    for position in (10, 40, 70, 84):
        text = " ".join(words[:position] + ["BREAK"] + words[position:])
        states = encode_prompts(ours.text_encoder, ours.tokenizer, [text], torch.device("cpu"))
        assert torch.isfinite(states).all(), position


def test_nan_latents_are_refused_before_decoding(ours):
    """Catches a garbage video written with exit 0: NaN latents after sampling are an error, not a decode."""
    def poison(pipe, step, t, state):
        return {"latents": state["latents"] * float("nan")}

    with pytest.raises(FloatingPointError, match="NaN"):
        ours("a cat", num_frames=2, height=16, width=16, num_inference_steps=2, callback_on_step_end=poison,
             generator=torch.Generator().manual_seed(0))


def test_prompt_editing_with_prompt_travel(ours):
    out = ours({0: "a [cat:dog:0.5]", 1: "a boat"}, num_frames=2, height=16, width=16, num_inference_steps=4,
               generator=torch.Generator().manual_seed(0), output_type="latent").frames
    fixed = ours({0: "a cat", 1: "a boat"}, num_frames=2, height=16, width=16, num_inference_steps=4,
                 generator=torch.Generator().manual_seed(0), output_type="latent").frames
    assert out.shape == fixed.shape and not torch.equal(out, fixed)


def test_long_prompt_chunks_break_after_a_nearby_comma(ours):
    """As the webui (comma_padding_backtrack 20): a chunk that fills up moves the text after a comma within the
    last 20 tokens into the next chunk, so a phrase is not cut in two."""
    tok = ours.tokenizer
    comma = tok(",", add_special_tokens=False).input_ids[-1]
    ids, _ = token_chunks(tok, ", ".join(["a cat dog sky red"] * 30), "a1111")  # token 76 is not a comma
    first = ids[0, 1:].tolist()
    last_text = max(i for i, t in enumerate(first) if t not in (tok.pad_token_id, tok.eos_token_id))
    assert first[last_text] == comma  # the first chunk ends at a comma, the phrase after it moved on
    phrase = tok("a cat dog sky red", add_special_tokens=False).input_ids
    assert ids[1, 1:1 + len(phrase)].tolist() == phrase
