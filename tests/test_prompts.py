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
    assert [torch.allclose(k, cat) for k in seen] == [True, True, False, False]
    assert all(torch.allclose(k, dog) for k in seen[2:])
    seen = _keys_seen(ours, prompt="a [cat|dog]", num_inference_steps=3, guidance_scale=1.0)
    assert [torch.allclose(k, cat) for k in seen] == [True, False, True]
    seen = _keys_seen(ours, prompt="a [cat:dog:0.5]", num_inference_steps=2, guidance_scale=7.0,
                      free_init_iterations=2, free_init_filter="gaussian")
    assert [torch.allclose(k, cat) for k in seen] == [True, False, True, False]
    plain = ours("a cat", num_frames=2, height=16, width=16, num_inference_steps=2, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).frames
    same = ours("a [cat:dog:5]", num_frames=2, height=16, width=16, num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(0)).frames
    assert torch.equal(plain, same)  # an edit after the last step never happens


def test_prompt_editing_with_prompt_travel(ours):
    out = ours({0: "a [cat:dog:0.5]", 1: "a boat"}, num_frames=2, height=16, width=16, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="latent").frames
    fixed = ours({0: "a cat", 1: "a boat"}, num_frames=2, height=16, width=16, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="latent").frames
    assert out.shape == fixed.shape and not torch.equal(out, fixed)


def test_long_prompt_chunks_break_after_a_nearby_comma(ours):
    """As the webui (comma_padding_backtrack 20): a chunk that fills up moves the text after a comma within the
    last 20 tokens into the next chunk, so a phrase is not cut in two."""
    tok = ours.tokenizer
    comma = tok(",", add_special_tokens=False).input_ids[-1]
    ids, _ = token_chunks(tok, ", ".join(["a cat dog"] * 30), "a1111")
    first = ids[0, 1:].tolist()
    last_text = max(i for i, t in enumerate(first) if t not in (tok.pad_token_id, tok.eos_token_id))
    assert first[last_text] == comma  # the first chunk ends at a comma, the phrase after it moved on
    phrase = tok("a cat dog", add_special_tokens=False).input_ids
    assert ids[1, 1:1 + len(phrase)].tolist() == phrase
