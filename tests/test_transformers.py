"""crossent.integrations.transformers against the unpatched transformers models.

Tiny randomly initialised models on CPU (no downloads). Each loss and parameter gradient of a
patched model is compared with two references:

- the unpatched model as transformers ships it (its ``ForCausalLMLoss`` computes the loss from
  float32 logits, so the comparison is at float32 precision even for a float64 model), and
- the unpatched model with a float64 ``ForCausalLMLoss`` (set through the public
  ``model.loss_function`` setter), which runs the model's own forward and logit transforms:
  the comparison is then at float64 precision.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")

from crossent.integrations import transformers as hf  # noqa: E402

VOCAB = 96
SEQ = 12
# float64 everywhere: the patched loss against the float64 reference, tightly; against the
# shipped model (float32 logits inside ForCausalLMLoss), at float32 precision.
TIGHT = {"rtol": 1e-10, "atol": 1e-12}
FLOAT32 = {"rtol": 2e-5, "atol": 2e-7}


# --------------------------------------------------------------------------------------------
# Models.

_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _llama(tied: bool) -> torch.nn.Module:
    config = transformers.LlamaConfig(**_TEXT, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config)


def _gemma2() -> torch.nn.Module:
    config = transformers.Gemma2Config(**_TEXT, head_dim=8, final_logit_softcapping=3.0)
    return transformers.Gemma2ForCausalLM(config)


def _qwen2() -> torch.nn.Module:
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_TEXT))


def _granite() -> torch.nn.Module:
    config = transformers.GraniteConfig(**_TEXT, logits_scaling=3.0, embedding_multiplier=2.0)
    return transformers.GraniteForCausalLM(config)


def _cohere() -> torch.nn.Module:
    return transformers.CohereForCausalLM(transformers.CohereConfig(**_TEXT, logit_scale=0.3))


def _qwen3_moe() -> torch.nn.Module:
    config = transformers.Qwen3MoeConfig(
        **_TEXT,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        output_router_logits=True,
        router_aux_loss_coef=0.1,
        experts_implementation="eager",  # grouped_mm has no float64 kernel
    )
    return transformers.Qwen3MoeForCausalLM(config)


def _phi() -> torch.nn.Module:  # an output embedding with a bias
    config = transformers.PhiConfig(**{**_TEXT, "num_key_value_heads": 4})
    return transformers.PhiForCausalLM(config)


IMAGE_TOKEN = VOCAB - 1
IMAGE_TOKENS = 4  # (16 / 8)² patches, CLS dropped


def _llava() -> torch.nn.Module:  # vision-language: ForConditionalGeneration
    vision = transformers.CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=transformers.LlamaConfig(**_TEXT),
        image_token_id=IMAGE_TOKEN,
        projector_hidden_act="gelu",
    )
    return transformers.LlavaForConditionalGeneration(config)


FAMILIES = {
    "llama": lambda: _llama(tied=False),
    "llama-tied": lambda: _llama(tied=True),
    "gemma2": _gemma2,
    "qwen2": _qwen2,
    "granite": _granite,
    "cohere": _cohere,
    "qwen3_moe": _qwen3_moe,
    "phi": _phi,
    "llava": _llava,
}


def _model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = FAMILIES[family]().double()
    if family in ("gemma2", "granite", "cohere"):
        with torch.no_grad():  # logits of a few units, so that the transforms matter
            model.lm_head.weight.mul_(40.0)
    model.config.use_cache = False
    model.train()
    return model


def _batch(family: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Two sequences; prompts of different lengths masked to -100."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB - 1, (2, SEQ), generator=gen)
    labels = input_ids.clone()
    labels[0, :3] = -100
    labels[1, :7] = -100
    batch = {"input_ids": input_ids, "labels": labels}
    if family == "llava":
        input_ids[:, 1 : 1 + IMAGE_TOKENS] = IMAGE_TOKEN
        labels[:, : 1 + IMAGE_TOKENS] = -100
        batch["pixel_values"] = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    return batch


def _float64_causal_lm_loss(
    logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **_
):
    """transformers' ForCausalLMLoss without its float32 upcast: the float64 reference."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.reshape(-1, vocab_size).double()
    target = shift_labels.reshape(-1)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, target, ignore_index=ignore_index)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return loss / num_items_in_batch


def _step(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(out, grads, ref_out, ref_grads, tol):
    torch.testing.assert_close(out.loss.double(), ref_out.loss.double(), **tol)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


# --------------------------------------------------------------------------------------------
# Loss and gradients.


@pytest.mark.parametrize("case", ["masked", "num_items_in_batch", "shift_labels"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_loss_and_every_gradient_equal_unpatched(family, case):
    reference = _model(family)
    patched = hf.apply(copy.deepcopy(reference), chunk_size=5)  # several chunks per batch
    inputs = _batch(family)
    if case == "num_items_in_batch":  # a micro-batch of a larger accumulated batch
        inputs["num_items_in_batch"] = torch.tensor(3 * 13)
    if case == "shift_labels":  # given explicitly, labels are then ignored by the loss
        gen = torch.Generator().manual_seed(7)
        shift = torch.randint(3, VOCAB - 1, (2, SEQ), generator=gen)
        shift[:, :5] = -100
        inputs["shift_labels"] = shift

    out, grads = _step(patched, **inputs)
    assert out.logits is None
    shipped_out, shipped_grads = _step(reference, **inputs)
    _assert_same(out, grads, shipped_out, shipped_grads, FLOAT32)
    reference.loss_function = _float64_causal_lm_loss
    exact_out, exact_grads = _step(reference, **inputs)
    _assert_same(out, grads, exact_out, exact_grads, TIGHT)
    if family == "qwen3_moe":  # the auxiliary loss is in the loss, and returned
        assert exact_out.aux_loss is not None and exact_out.aux_loss > 0
        torch.testing.assert_close(out.aux_loss, exact_out.aux_loss, **TIGHT)


def test_transforms_are_not_vacuous():
    """The soft-cap, scale and scaling change the loss, so the tests above can see them."""
    for family, attribute, neutral in [
        ("gemma2", "final_logit_softcapping", None),
        ("granite", "logits_scaling", 1.0),
        ("cohere", "logit_scale", 1.0),
    ]:
        model = hf.apply(_model(family))
        loss = model(**_batch(family)).loss
        setattr(model.config, attribute, neutral)
        if family == "cohere":
            model.logit_scale = neutral
        assert abs(model(**_batch(family)).loss.item() - loss.item()) > 1e-2, family


def test_options_pass_through():
    """z_loss and label_smoothing reach linear_cross_entropy (against a float64 oracle)."""
    model = _model("llama")
    inputs = _batch("llama")
    patched = hf.apply(copy.deepcopy(model), z_loss=1e-2, label_smoothing=0.1)
    loss = patched(**inputs).loss
    hidden = model.model(input_ids=inputs["input_ids"]).last_hidden_state
    logits = model.lm_head(hidden).reshape(-1, VOCAB)
    target = F.pad(inputs["labels"], (0, 1), value=-100)[..., 1:].reshape(-1)
    keep = target != -100
    expected = F.cross_entropy(logits, target, label_smoothing=0.1)
    expected = expected + 1e-2 * torch.logsumexp(logits[keep], -1).pow(2).mean()
    torch.testing.assert_close(loss, expected, **TIGHT)


class _PaddedVocabLlama(transformers.LlamaForCausalLM):
    """An embedding padded to a multiple of 8 rows, trimmed to the real vocabulary."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden = self.model(input_ids=input_ids).last_hidden_state
        logits = self.lm_head(hidden)[..., : self.config.unpadded_vocab_size]
        loss = self.loss_function(logits, labels, self.config.unpadded_vocab_size, **kwargs)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


class _TransformedLlama(transformers.LlamaForCausalLM):
    """Llama whose forward applies ``self.logit_transform`` to the logits."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden = self.model(input_ids=input_ids).last_hidden_state
        logits = self.logit_transform(self.lm_head(hidden))
        loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


def _transformed_llama(transform):
    torch.manual_seed(0)
    model = _TransformedLlama(transformers.LlamaConfig(**_TEXT)).double().train()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.logit_transform = transform
    return model


@pytest.mark.parametrize(
    "transform",
    [
        lambda z: torch.tanh(3.0 * z / 7.0) * -2.5,  # B tanh(A z) with B < 0
        lambda z: (z * 0.5).tanh() / 0.25 * 0.5,  # factors on both sides of the tanh
        lambda z: z * torch.tensor(0.3, dtype=torch.float64) / 2.0,  # a 0-d tensor factor
    ],
    ids=["negative-cap", "both-sides", "tensor-factor"],
)
def test_any_scale_tanh_scale_chain_folds_exactly(transform):
    reference = _transformed_llama(transform)
    patched = hf.apply(copy.deepcopy(reference), chunk_size=5)
    out, grads = _step(patched, **_batch("llama"))
    reference.loss_function = _float64_causal_lm_loss
    ref_out, ref_grads = _step(reference, **_batch("llama"))
    _assert_same(out, grads, ref_out, ref_grads, TIGHT)


def test_padded_vocabulary_trim():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**_TEXT, "vocab_size": VOCAB + 8})
    config.unpadded_vocab_size = VOCAB - 5
    reference = _PaddedVocabLlama(config).double().train()
    patched = hf.apply(copy.deepcopy(reference), chunk_size=7)
    inputs = _batch("llama")
    inputs["labels"] = inputs["labels"].clamp(max=VOCAB - 6)
    out, grads = _step(patched, **inputs)
    reference.loss_function = _float64_causal_lm_loss
    ref_out, ref_grads = _step(reference, **inputs)
    _assert_same(out, grads, ref_out, ref_grads, TIGHT)
    assert out.logits is None
    assert grads["lm_head.weight"][VOCAB - 5 :].abs().max() == 0  # padding rows: no gradient


def test_strict_refuses_an_unknown_transform_naming_the_model_type():
    reference = _transformed_llama(lambda z: torch.sigmoid(z) * 10.0)
    inputs = _batch("llama")
    patched = hf.apply(copy.deepcopy(reference))
    with pytest.raises(hf.UnsupportedModelError, match="'llama'.*sigmoid"):
        patched(**inputs)
    # strict=False: the logits are computed where needed, the loss is the original one.
    hf.apply(patched, strict=False)
    with pytest.warns(RuntimeWarning, match="sigmoid"):
        out, grads = _step(patched, **inputs)
    ref_out, ref_grads = _step(reference, **inputs)
    _assert_same(out, grads, ref_out, ref_grads, TIGHT)


def test_apply_refuses_a_head_that_is_not_linear():
    model = _model("llama")
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(hf.UnsupportedModelError, match="'llama'.*Sequential"):
        hf.apply(model)
    with pytest.warns(RuntimeWarning, match="left unpatched"):
        hf.apply(model, strict=False)
    assert not hf.is_patched(model)


def test_refuses_a_head_weight_it_cannot_read_directly():
    model = hf.apply(_model("llama"))
    model.lm_head.weight = torch.nn.Parameter(torch.empty(VOCAB, 32, device="meta"))
    with pytest.raises(hf.UnsupportedModelError, match="'llama'.*meta"):
        model(**_batch("llama"))


def test_lm_head_loss_for_custom_loops():
    for family in ("gemma2", "granite", "cohere", "phi"):
        model = _model(family)
        inputs = _batch(family)
        model.loss_function = _float64_causal_lm_loss
        num_items = torch.tensor(21)
        expected, ref_grads = _step(model, **inputs, num_items_in_batch=num_items)
        model.zero_grad(set_to_none=True)
        hidden = model.model(input_ids=inputs["input_ids"]).last_hidden_state
        loss = hf.lm_head_loss(
            hidden,
            model.lm_head,
            inputs["labels"],
            num_items_in_batch=num_items,
            config=model.config,
            chunk_size=4,
        )
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        torch.testing.assert_close(loss, expected.loss, **TIGHT)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], **TIGHT)


# --------------------------------------------------------------------------------------------
# The original forward wherever the logits are asked for.


def test_eval_generate_and_logit_requests_run_the_original_forward():
    reference = _model("gemma2")
    patched = hf.apply(copy.deepcopy(reference))
    inputs = _batch("gemma2")
    for model in (reference, patched):
        model.eval()
    with torch.no_grad():
        ref, out = reference(**inputs), patched(**inputs)
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
        prompt = inputs["input_ids"][:, :4]
        options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(
            patched.generate(prompt, **options), reference.generate(prompt, **options)
        )
    for model in (reference, patched):
        model.train()
    # Training mode, but logits wanted: no labels, logits_to_keep, return_dict=False.
    no_labels = {"input_ids": inputs["input_ids"]}
    torch.testing.assert_close(patched(**no_labels).logits, reference(**no_labels).logits, **TIGHT)
    kept = patched(**inputs, logits_to_keep=SEQ)
    assert kept.logits is not None and kept.logits.shape == (2, SEQ, VOCAB)
    as_tuple = patched(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[1], reference(**inputs).logits, **TIGHT)


def test_unpatch_other_instances_state_dict_and_signature():
    model = _model("llama")
    other = _model("llama")
    keys = list(model.state_dict())
    signature = inspect.signature(model.forward)
    hf.apply(model)
    hf.apply(model)  # twice: harmless
    assert hf.is_patched(model) and not hf.is_patched(other)
    assert inspect.signature(model.forward) == signature  # the Trainer reads **kwargs from it
    assert list(model.state_dict()) == keys
    assert model(**_batch("llama")).logits is None
    assert other(**_batch("llama")).logits is not None  # the class is untouched
    clone = copy.deepcopy(model)  # the copy is patched, bound to itself
    assert clone(**_batch("llama")).logits is None
    assert clone.forward.__self__ is clone
    hf.unpatch(model)
    assert not hf.is_patched(model) and "forward" not in model.__dict__
    assert hf.is_patched(clone)
    out = model(**_batch("llama"))
    assert out.logits is not None and out.logits.shape == (2, SEQ, VOCAB)
    hf.unpatch(model)  # twice: harmless


def test_autocast_bf16_close_to_unpatched():
    reference = _model("llama").float()
    patched = hf.apply(copy.deepcopy(reference))
    inputs = _batch("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _step(patched, **inputs)
        ref_out, ref_grads = _step(reference, **inputs)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=2e-2, atol=0)
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max()
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=5e-2 * scale.item())


def test_bfloat16_model_close_to_unpatched():
    """bf16 weights: crossent returns the loss rounded to bf16 (then float32, as transformers'
    loss), so the value agrees to bf16 precision; the gradients to bf16 noise."""
    reference = _model("llama").to(torch.bfloat16)
    patched = hf.apply(copy.deepcopy(reference))
    inputs = {**_batch("llama"), "num_items_in_batch": torch.tensor(20)}
    out, grads = _step(patched, **inputs)
    ref_out, ref_grads = _step(reference, **inputs)
    assert out.loss.dtype == ref_out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-2, atol=0)
    for name, grad in grads.items():
        scale = ref_grads[name].float().abs().max().item()
        torch.testing.assert_close(grad.float(), ref_grads[name].float(), rtol=0, atol=3e-2 * scale)


# --------------------------------------------------------------------------------------------
# No N×V tensor.


class _LargestTensor(TorchDispatchMode):
    """Records the element count of every tensor an op creates."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor) and value.numel() > self.largest:
                self.largest, self.op = value.numel(), func
        return out


def test_no_tokens_by_vocab_tensor_in_a_patched_step():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**_TEXT, "vocab_size": 1024, "hidden_size": 16})
    reference = transformers.LlamaForCausalLM(config).train()
    patched = hf.apply(copy.deepcopy(reference), chunk_size=8)
    input_ids = torch.randint(3, 1024, (2, 32))
    n_by_v = input_ids.numel() * 1024
    inputs = {"input_ids": input_ids, "labels": input_ids}
    with _LargestTensor() as seen:
        patched(**inputs).loss.backward()
    assert seen.largest < n_by_v, (seen.largest, seen.op)
    with _LargestTensor() as seen:  # the check can fail: the unpatched step holds N×V
        reference(**inputs).loss.backward()
    assert seen.largest >= n_by_v


# --------------------------------------------------------------------------------------------
# The real Trainer: gradient accumulation.


def _trainer_examples():
    dataset = []
    gen = torch.Generator().manual_seed(3)
    for i in range(4):  # uneven masks: 2, 5, 8 and 11 prompt tokens
        input_ids = torch.randint(3, VOCAB - 1, (SEQ,), generator=gen)
        labels = input_ids.clone()
        labels[: 2 + 3 * i] = -100
        dataset.append({"input_ids": input_ids, "labels": labels})
    return dataset


def _trainer_update(model, batch_size, accumulation, tmp_path):
    dataset = _trainer_examples()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    transformers.Trainer(model=model, args=args, train_dataset=dataset).train()
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}


def test_trainer_gradient_accumulation(tmp_path):
    base = _model("llama")
    expected = _trainer_update(copy.deepcopy(base), 4, 1, tmp_path)
    for batch_size, accumulation in [(4, 1), (2, 2), (1, 4)]:
        patched = hf.apply(copy.deepcopy(base), chunk_size=5)
        update = _trainer_update(patched, batch_size, accumulation, tmp_path)
        for name, delta in update.items():
            torch.testing.assert_close(
                delta, expected[name], **FLOAT32, msg=lambda m, n=name: f"{n}: {m}"
            )
    # The check can fail: averaging the micro-batches' means (the classic accumulation bug)
    # gives another update on these uneven masks.
    model = copy.deepcopy(base)
    for pair in (_trainer_examples()[:2], _trainer_examples()[2:]):
        batch = {k: torch.stack([example[k] for example in pair]) for k in pair[0]}
        (model(**batch).loss / 2).backward()
    wrong = {n: p.grad for n, p in model.named_parameters()}
    assert max((wrong[n] - expected[n]).abs().max() for n in expected) > 1e-4


def test_trl_sft_trainer_recipe(tmp_path, monkeypatch):
    """docs/transformers.md's SFTTrainer subclass trains on crossent's loss, and its update
    equals stock SFTTrainer's (TRL's own logits-free head), with completion-only masks."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="t0", eos_token="t2"
    )
    gen = torch.Generator().manual_seed(3)

    def text(n):
        return " ".join(f"t{int(i)}" for i in torch.randint(3, VOCAB, (n,), generator=gen))

    rows = [{"prompt": text(2 + 3 * k), "completion": text(6)} for k in range(4)]
    dataset = datasets.Dataset.from_list(rows)

    class CrossentSFTTrainer(trl.SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            return transformers.Trainer.compute_loss(
                self,
                model,
                inputs,
                return_outputs=return_outputs,
                num_items_in_batch=num_items_in_batch,
            )

    def update(trainer_class, model, batch_size, accumulation):
        args = trl.SFTConfig(
            output_dir=str(tmp_path),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=0.0,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            logging_strategy="no",
            bf16=False,  # SFTConfig's default is bf16 autocast
        )
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer_class(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer
        ).train()
        return {n: before[n] - p.detach() for n, p in model.named_parameters()}

    base = _model("llama")
    expected = update(trl.SFTTrainer, copy.deepcopy(base), 4, 1)
    calls = []
    real = hf._loss.linear_cross_entropy  # what the loss calls
    monkeypatch.setattr(
        hf._loss, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    got = update(CrossentSFTTrainer, hf.apply(copy.deepcopy(base), chunk_size=5), 2, 2)
    assert len(calls) == 2  # both micro-batches went through crossent
    for name, delta in got.items():
        torch.testing.assert_close(delta, expected[name], **FLOAT32)
