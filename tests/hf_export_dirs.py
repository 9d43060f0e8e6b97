"""A complete tiny Hugging Face Llama directory as users download them: a random transformers Llama
(``tests/tiny_hf.py``) saved with save_pretrained, a byte-level BPE ``tokenizer.json`` trained here (nothing
can be downloaded) wrapped in transformers' PreTrainedTokenizerFast with a chat template, and a
generation_config with non-default values; for the export tests (tests/unit/test_hf_export_files.py,
tests/e2e/test_hf_exports.py)."""
from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mftune.checkpoint import load_checkpoint
from mftune.checkpoint.formats import checkpoint_header
from mftune.checkpoint.load import fingerprint
from mftune.models.llama import LlamaForCausalLM
from mftune.pet import get_pet_model, lora_layers, lora_state_dict
from lora_checkpoint import PET, save_lora
from tiny_hf import hf_model

VOCAB = 320  # 256 bytes + merges + 3 special tokens
SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: tiny_hf's pad id 0, LlamaConfig's bos 1 / eos 2
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXT = ["The quick brown fox jumps over the lazy dog.", "Hello world, how are you today?",
        "LoRA fine-tuning of Llama models on CPUs and GPUs.", "Numbers 12345 and symbols #@! too."] * 4
SAMPLE = "Hello world, the quick fox."


def tokenizer() -> "transformers.PreTrainedTokenizerFast":
    """A byte-level BPE tokenizer of ``VOCAB`` ids with bos/eos/pad and ``CHAT_TEMPLATE``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", chat_template=CHAT_TEMPLATE)


def save_hf_dir(directory: str, tie: bool = False) -> "transformers.LlamaForCausalLM":
    """A transformers Llama, its tokenizer and generation_config saved in ``directory``; returns the model."""
    tok = tokenizer()
    model = hf_model(tie=tie, vocab_size=len(tok), bos_token_id=1, eos_token_id=2)
    model.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                                            max_new_tokens=7, do_sample=False, repetition_penalty=1.0)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return model


def prompt_ids(tok) -> torch.Tensor:
    """The chat-templated sample prompt as a [1, seq] batch."""
    ids = tok.apply_chat_template([{"role": "user", "content": SAMPLE}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return torch.tensor([ids])


def greedy(forward, ids: torch.Tensor, steps: int = 7) -> list[int]:
    """Greedy decoding by full forward passes (no cache): the reference for ``generate``; ``forward(ids)``
    returns logits [batch, seq, vocab]."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, forward(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0].tolist()


def lora_over(base_path: str, lora_path: str) -> LlamaForCausalLM:
    """A LoRA training checkpoint at ``lora_path`` over the base ``base_path`` (a converted mftune file or a
    Hugging Face directory, recorded as the trainer records it), random adapters; returns the LoRA model."""
    mc = {**checkpoint_header(base_path)["model_config"], "compute_dtype": "float32", "param_init_type": "float32"}
    model = LlamaForCausalLM(dict(mc))
    load_checkpoint(model, base_path)
    get_pet_model(model, PET).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in (layer.mindpet_delta_lora_a, layer.mindpet_delta_lora_b):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_lora(lora_path, lora_state_dict(model), mc, {"path": base_path, "fingerprint": fingerprint(base_path)})
    return model
