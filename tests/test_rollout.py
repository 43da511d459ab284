import torch

from lit_align.hf import load_model, load_tokenizer
from lit_align.losses import token_logprobs
from lit_align.rollout import completion_mask, generate, position_ids_from_mask


def test_completion_mask_keeps_first_eos_and_drops_the_rest():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 5, 5, 5]])
    assert completion_mask(ids, 1).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert completion_mask(ids, [1, 8]).tolist()[1] == [1, 1, 1, 1]
    assert completion_mask(ids, [7]).tolist()[0] == [1, 1, 1, 0]


def test_position_ids_skip_left_padding():
    m = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert position_ids_from_mask(m).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_generate_shapes_logprobs_and_mode(ckpt):
    tok, model = load_tokenizer(ckpt), load_model(ckpt).train()
    enc = tok(["37+48=", "1+2="], padding=True, return_tensors="pt")
    torch.manual_seed(0)
    r = generate(model, tok, enc.input_ids, enc.attention_mask, num_generations=3, max_new_tokens=5, temperature=0.8)
    assert model.training, "generate must put the model back in train mode"
    assert r.prompt_ids.shape[0] == 6 and r.completion_ids.shape[0] == 6
    assert torch.equal(r.prompt_ids[0], r.prompt_ids[2]) and torch.equal(r.prompt_ids[3], enc.input_ids[1])
    assert r.completion_ids.shape[1] <= 5 and len(r.completions) == 6
    # masks: nothing counts after the first EOS
    assert torch.equal(r.completion_mask, completion_mask(r.completion_ids, tok.eos_token_id))
    # log-probs at sampling time equal a fresh full forward (with temperature, skipping left pad)
    with torch.no_grad():
        model.eval()
        ids, mask = r.input_ids, r.attention_mask
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        P = r.prompt_ids.shape[1]
        ref = token_logprobs(logits[:, P - 1 : -1], r.completion_ids, 0.8) * r.completion_mask
    assert torch.allclose(r.old_logp, ref, atol=1e-4)
    assert (r.entropy >= 0).all() and (r.entropy[r.completion_mask == 0] == 0).all()
    # decoded texts hold only the tokens before EOS
    for text, row, m in zip(r.completions, r.completion_ids, r.completion_mask):
        assert text == tok.decode(row[m.bool()], skip_special_tokens=True)


def test_greedy_is_deterministic(ckpt):
    tok, model = load_tokenizer(ckpt), load_model(ckpt)
    enc = tok(["12+34="], return_tensors="pt")
    a = generate(model, tok, enc.input_ids, enc.attention_mask, greedy=True, max_new_tokens=4)
    b = generate(model, tok, enc.input_ids, enc.attention_mask, greedy=True, max_new_tokens=4)
    assert a.completions == b.completions and a.completion_ids.shape[0] == 1
