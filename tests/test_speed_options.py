"""Speed options change speed and memory only: batched guidance, hint reuse, bf16 GroupNorm, checkpointing, AdamW,
sliced attention."""

import subprocess
import sys

import pytest
import torch

import ldm.modules.attention as attention
from cldm.model import create_model
from conftest import ROOT, randomize_zero_convs
from ldm.checkpoint import UserError
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.guidance import batch_conditionings
from ldm.modules.attention import CrossAttention, set_attention_slicing
from ldm.modules.diffusionmodules.openaimodel import ResBlock, set_gradient_checkpointing
from ldm.modules.diffusionmodules.util import GroupNorm32


def conditioning(model, n=2):
    gen = torch.Generator().manual_seed(5)
    hint = torch.rand(n, 3, 32, 32, generator=gen)
    cond = {"c_concat": [hint], "c_crossattn": [model.get_learned_conditioning(["a red circle"] * n)]}
    uncond = {"c_concat": [hint], "c_crossattn": [model.get_learned_conditioning([""] * n)]}
    return cond, uncond


def test_batched_guidance_matches_separate_passes(tiny_model):
    randomize_zero_convs(tiny_model)
    cond, uncond = conditioning(tiny_model)
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    out = {}
    for batched in (True, False):
        calls = []
        handle = tiny_model.model.diffusion_model.register_forward_hook(lambda m, a, k, o: calls.append(len(o)),
                                                                         with_kwargs=True)
        out[batched], _ = DDIMSampler(tiny_model, batch_guidance=batched).sample(
            4, 2, (4, 4, 4), cond, x_T=x_T, verbose=False, unconditional_guidance_scale=7.5,
            unconditional_conditioning=uncond)
        handle.remove()
        assert calls == ([4] * 4 if batched else [2] * 8)
    assert (out[True] - out[False]).abs().max() <= 1e-4 * out[False].abs().max()
    assert batch_conditionings({"c_concat": None, "c_crossattn": [uncond["c_crossattn"][0]]}, cond) is None


def test_hint_encoding_is_reused_only_while_sampling_the_same_hint(tiny_model):
    randomize_zero_convs(tiny_model)
    cond, _ = conditioning(tiny_model)
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([3, 900])
    runs = []
    tiny_model.control_model.input_hint_block.register_forward_hook(lambda *a: runs.append(1))
    with torch.no_grad():
        first = tiny_model.apply_model(x, t, cond)
        again = tiny_model.apply_model(x, t, cond)
    assert len(runs) == 1 and torch.equal(first, again)
    with torch.no_grad():
        tiny_model.control_model.input_hint_block[14].weight.mul_(2.0)  # new weights: a new encoding
        changed = tiny_model.apply_model(x, t, cond)
        cond["c_concat"][0].mul_(0.5)  # the hint changed in place: a new encoding
        tiny_model.apply_model(x, t, cond)
    assert len(runs) == 3 and not torch.allclose(first, changed)
    tiny_model.apply_model(x, t, cond)  # with grad (training), never from the cache
    assert len(runs) == 4


def test_groupnorm_keeps_bf16_and_computes_fp16_in_fp32():
    norm = GroupNorm32(32, 64)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 64, 8, 8) * 3 + 1
    ref = norm(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = norm(x.bfloat16())
    assert bf16.dtype == torch.bfloat16 and torch.allclose(bf16.float(), ref, rtol=2e-2, atol=2e-2)
    half = norm(x.half())
    assert half.dtype == torch.float16 and torch.allclose(half.float(), ref, atol=5e-3)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    randomize_zero_convs(tiny_model)
    tiny_model.train()
    cond, _ = conditioning(tiny_model)
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([3, 900])
    grads = {}
    for flag in (False, True):
        set_gradient_checkpointing(tiny_model, flag)
        assert all(m.use_checkpoint == flag for m in tiny_model.modules() if isinstance(m, ResBlock))
        tiny_model.apply_model(x, t, cond).square().mean().backward()
        grads[flag] = [p.grad.clone() for p in tiny_model.trainable_parameters()]
        tiny_model.zero_grad(set_to_none=True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[False], grads[True]))


def test_optimizer_choice(tiny_model, tmp_path, monkeypatch):
    trained = tiny_model.trainable_parameters()
    assert trained and all(n.startswith("control_model.") for n, p in tiny_model.named_parameters() if p.requires_grad)
    assert tiny_model.make_optimizer(trained).defaults["fused"]  # parameters on the CPU: fused kernel
    tiny_model.optimizer_name = "sgd"
    with pytest.raises(ValueError, match="adamw8bit"):
        tiny_model.make_optimizer(trained)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without it
    tiny_model.optimizer_name = "adamw8bit"
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        tiny_model.make_optimizer(trained)
    from tutorial_train import main
    with pytest.raises(UserError, match="--optimizer adamw8bit needs bitsandbytes") as refused:
        main(["--config", str(ROOT / "models" / "cldm_tiny.yaml"), "--resume_path", "none",
              "--optimizer", "adamw8bit", "--output_dir", str(tmp_path)])
    assert refused.value.advice == "pip install bitsandbytes"


def test_adamw8bit_trains_and_resumes(tmp_path):
    import bitsandbytes as bnb

    from tool_make_fill50k import make_fill50k
    from tutorial_train import main
    data = make_fill50k(tmp_path / "fill50k", n=8, size=32, seed=0)
    args = ["--config", str(ROOT / "models" / "cldm_tiny.yaml"), "--data_root", str(data),
            "--batch_size", "4", "--output_dir", str(tmp_path / "run"), "--accelerator", "cpu", "--devices", "1",
            "--logger_freq", "100", "--optimizer", "adamw8bit", "--learning_rate", "1e-3", "--seed", "0",
            "--sd_locked", "False"]  # a random UNet's zero output layer must train for anything to learn
    trainer = main([*args, "--max_steps", "4", "--resume_path", "none"])
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    moments = {p.numel(): s["state1"].dtype for p, s in optimizer.state.items()}
    # bitsandbytes keeps the moments of tensors of 4096+ elements in 8 bits, the small ones in float32
    assert {d for n, d in moments.items() if n >= 4096} == {torch.uint8}
    assert {d for n, d in moments.items() if n < 4096} == {torch.float32}
    before = {k: v.clone() for k, v in trainer.lightning_module.control_model.state_dict().items()}

    resumed = main([*args, "--max_steps", "6", "--force", "--resume", str(tmp_path / "run/checkpoints/last.ckpt")])
    assert resumed.global_step == 6
    restored = resumed.optimizers[0].state
    assert sorted(int(s["step"]) for s in restored.values()) == [6] * len(restored)
    after = resumed.lightning_module.control_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_compile_keeps_the_checkpoint_keys(tiny_model):
    keys = list(tiny_model.state_dict())
    tiny_model.compile_denoiser(mode="reduce-overhead")  # lazy: nothing compiles until a forward
    assert list(tiny_model.state_dict()) == keys
    assert tiny_model.model.diffusion_model._compiled_call_impl is not None
    assert tiny_model.control_model._compiled_call_impl is not None


def test_sliced_attention_is_an_argument_of_one_model_and_changes_only_memory(tiny_model, monkeypatch):
    randomize_zero_convs(tiny_model)
    cond, _ = conditioning(tiny_model)
    x, t = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 700])
    attend, passes = attention.F.scaled_dot_product_attention, []
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda q, *args, **kwargs: passes.append(q.shape[2]) or attend(q, *args, **kwargs))
    with torch.no_grad():
        whole = tiny_model.apply_model(x, t, cond)
        queries, passes[:] = list(passes), []
        other = create_model(ROOT / "models" / "cldm_tiny.yaml")
        layers = [m for m in tiny_model.modules() if isinstance(m, CrossAttention)]
        assert set_attention_slicing(tiny_model, 5) == len(layers) == len(queries)
        sliced = tiny_model.apply_model(x, t, cond)
    assert max(passes) == 5 and sum(passes) == sum(queries) and len(passes) > len(queries)
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-6)
    assert {m.slice_size for m in other.modules() if isinstance(m, CrossAttention)} == {None}  # no process state
    with pytest.raises(ValueError, match="slice_size"):
        set_attention_slicing(tiny_model, 0)


def test_share_slices_attention_for_scripts_written_against_the_original():
    """config.save_memory, then `import share` (the original's way): every CrossAttention built afterwards slices."""
    script = ("from ldm.modules.attention import CrossAttention\n"
              "before = CrossAttention(8).slice_size\n"
              "import config\nconfig.save_memory = True\nimport share\n"
              "print(before, CrossAttention(8).slice_size, CrossAttention(8, slice_size=7).slice_size)")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.stdout.split() == ["None", "1024", "7"], run.stderr


@pytest.mark.parametrize("config,size", [("cldm_tiny_t2i.yaml", 32), ("cldm_tiny_xs.yaml", 32),
                                         ("cldm_tiny_v21_xs.yaml", 32), ("cldm_tiny_xl_union.yaml", 64)])
def test_gradient_checkpointing_gives_the_same_gradients_in_every_mode(config, size):
    """--gradient_checkpointing on the later architectures: the T2I-Adapter's features and the XS exchange reach the
    UNet's checkpointed blocks from outside them, the union's hints go through its own: the same loss and gradients."""
    from conftest import model_as_trained
    model = model_as_trained(ROOT / "models" / config, control=True).train()
    g = torch.Generator().manual_seed(0)
    image, hint = torch.rand(2, size, size, 3, generator=g) * 2 - 1, torch.rand(2, size, size, 3, generator=g)
    batch = {"jpg": image, "hint": hint, "txt": ["a red circle", "a blue square"]}
    results = {}
    for flag in (False, True):
        set_gradient_checkpointing(model, flag)
        torch.manual_seed(1)  # the same timesteps and noise
        loss, _ = model.shared_step(batch)
        loss.backward()
        results[flag] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
    assert any(m.use_checkpoint for m in model.modules() if isinstance(m, ResBlock))
    (loss, grads), (loss_checkpointed, grads_checkpointed) = results[False], results[True]
    assert torch.equal(loss, loss_checkpointed)
    assert grads.keys() == grads_checkpointed.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
