#!/usr/bin/env python3
"""Hugging Face parity fixtures for tests/model/hf_parity_test.cpp.

  make_hf_fixtures.py OUT        tiny random GPT-2, Llama (GQA, untied), Llama (GQA, tied,
                                 rope_theta 5e5) and Qwen2 (GQA, q/k/v biases) checkpoints,
                                 saved with save_pretrained(safe_serialization=True) into
                                 OUT/<name>/, each with reference.safetensors holding
                                 "tokens" (F32 ids, [2, 11]) and "logits" (F32, [2, 11, V])
                                 from transformers (eager attention, float32).
  make_hf_fixtures.py --check DIR...
                                 loads each DIR (written by our save_model) with
                                 transformers, runs DIR/tokens.safetensors' "tokens" and
                                 writes DIR/hf_logits.safetensors ("logits").

Exit code 3 when torch / transformers / safetensors are missing (the test skips).
"""
import sys

try:
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
except ImportError as e:  # pragma: no cover - environment dependent
    print(f"missing python package: {e}", file=sys.stderr)
    sys.exit(3)

VOCAB = 97
TOKENS = [[1, 5, 17, 42, 96, 0, 3, 3, 60, 77, 12], [95, 2, 2, 8, 31, 64, 50, 7, 9, 88, 40]]


def randomize(model, seed):
    """Replaces transformers' small init by larger random values so that every parameter
    (norm weights and biases included) moves the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def fixtures():
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-6, attn_implementation="eager")
    return {
        "gpt2": (transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                         n_positions=32, layer_norm_epsilon=1e-5,
                                         bos_token_id=0, eos_token_id=0,
                                         attn_implementation="eager"),
                 transformers.GPT2LMHeadModel),
        "llama_gqa": (transformers.LlamaConfig(tie_word_embeddings=False, **common),
                      transformers.LlamaForCausalLM),
        "llama_tied": (transformers.LlamaConfig(tie_word_embeddings=True, rope_theta=500000.0,
                                                **common),
                       transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config(tie_word_embeddings=False, **common),
                  transformers.Qwen2ForCausalLM),
    }


def make(out):
    torch.manual_seed(0)
    tokens = torch.tensor(TOKENS, dtype=torch.long)
    for i, (name, (cfg, cls)) in enumerate(fixtures().items()):
        model = cls(cfg).float().eval()
        randomize(model, seed=100 + i)
        if getattr(cfg, "tie_word_embeddings", False):
            model.tie_weights()
        with torch.no_grad():
            logits = model(tokens).logits.float()
        model.save_pretrained(f"{out}/{name}", safe_serialization=True)
        save_file({"tokens": tokens.float(), "logits": logits.contiguous()},
                  f"{out}/{name}/reference.safetensors")
        print(f"{name}: logits {tuple(logits.shape)}, |logits| max {logits.abs().max():.3f}")


def check(dirs):
    for d in dirs:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            d, attn_implementation="eager", dtype=torch.float32).eval()
        tokens = load_file(f"{d}/tokens.safetensors")["tokens"].long()
        with torch.no_grad():
            logits = model(tokens).logits.float()
        save_file({"logits": logits.contiguous()}, f"{d}/hf_logits.safetensors")
        print(f"{d}: {type(model).__name__} logits {tuple(logits.shape)}")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--check":
        check(sys.argv[2:])
    elif len(sys.argv) == 2:
        make(sys.argv[1])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
