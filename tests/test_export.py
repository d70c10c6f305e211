"""``python -m ncp.export``: the kohya file loads through diffusers' own kohya conversion and draws the
diffusers LoRA's images; the merged pipeline draws base + LoRA's images."""
import json

import numpy as np
import pytest
import torch

from ncp.export import export_kohya, export_merged, main, read_lora, sgm_module_name

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# every kind of layer the SGM renaming touches: attention, transformer projections, feed-forward,
# resnet convs, time embedding projections, shortcut convs, down/upsamplers
ALL_LAYERS = ATTENTION + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "time_emb_proj",
                          "conv_shortcut", "conv"]

SDXL_UNET = {"layers_per_block": 2, "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}


@pytest.mark.parametrize("module, sgm", [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.2.attentions.1.proj_in", "input_blocks.8.1.proj_in"),
    ("down_blocks.0.resnets.1.conv2", "input_blocks.2.0.out_layers.3"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("mid_block.attentions.0.transformer_blocks.3.ff.net.2", "middle_block.1.transformer_blocks.3.ff.net.2"),
    ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
    ("up_blocks.0.attentions.2.proj_out", "output_blocks.2.1.proj_out"),
    ("up_blocks.1.resnets.0.conv_shortcut", "output_blocks.3.0.skip_connection"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("conv_in", "input_blocks.0.0"),
])
def test_sgm_names_of_sdxl(module, sgm):
    """SDXL's published U-Net (2 layers per block): the names sd-scripts writes."""
    assert sgm_module_name(module, SDXL_UNET) == sgm


def _lora_run(model_dir, kind, targets, tmp_path, alpha=8.0):
    """A LoRA with random (non-zero) up weights on ``targets``, saved as ncp.train saves it."""
    from ncp.models import add_lora, load_models, save_lora

    models = load_models(str(model_dir), "auto", torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    add_lora(models.unet, 4, alpha, targets, 0.0)
    for name, p in models.unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.2, generator=torch.Generator().manual_seed(len(name)))
    lora_dir = tmp_path / "run" / "lora"
    save_lora(models.unet, lora_dir, kind)
    return lora_dir


def _images(pipe_cls, model_dir, lora=None, ncp_lora=None, **load):
    """Two images of the pipeline, with ``lora`` through ``load_lora_weights`` or ``ncp_lora`` through ncp's
    own loader (``add_lora`` + ``load_lora_into``, as a resumed run reads its checkpoint)."""
    from ncp.export import read_lora
    from ncp.models import add_lora, load_lora_into

    pipe = pipe_cls.from_pretrained(str(model_dir), **load)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    if ncp_lora is not None:
        modules, alpha, rank = read_lora(ncp_lora)
        add_lora(pipe.unet, rank, alpha, sorted(modules), 0.0)
        load_lora_into(pipe.unet, ncp_lora)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    return pipe(prompt=["a red cube", "two blue balls"], generator=gens, num_inference_steps=3, guidance_scale=3.0,
                output_type="np").images


@pytest.mark.parametrize("kind, targets", [("sd15", ATTENTION), ("sdxl", ATTENTION), ("sdxl", ALL_LAYERS),
                                           ("sd15", ALL_LAYERS)])
def test_kohya_file_gives_the_diffusers_loras_images(kind, targets, tiny_sd15, tiny_sdxl, tmp_path):
    """Images through diffusers' kohya conversion (``load_lora_weights`` on the file) equal those of the
    diffusers-format LoRA: same float32 weights and scale alpha / rank, so up to float rounding (1e-5).
    The reference for LoRAs beyond the attention projections is ncp's own loader: diffusers 0.42's
    ``load_lora_weights`` on the diffusers-format folder drops the attention layers of such a LoRA (the old
    ``lora.down`` key format mixed with other layers), while its kohya conversion loads every layer."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    model = tiny_sdxl if kind == "sdxl" else tiny_sd15
    pipe_cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    lora_dir = _lora_run(model, kind, targets, tmp_path, alpha=8.0)  # alpha != rank: alpha must travel
    out = export_kohya(lora_dir, str(model), tmp_path / "kohya.safetensors")

    from safetensors.torch import load_file

    state = load_file(str(out))
    modules, alpha, rank = read_lora(lora_dir)
    assert len(state) == 3 * len(modules) and (alpha, rank) == (8.0, 4)
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in state)
    names = " ".join(state)
    assert ("input_blocks" in names) == (kind == "sdxl") and ("down_blocks" in names) == (kind == "sd15")

    extra = {} if kind == "sdxl" else {"safety_checker": None}
    base = _images(pipe_cls, model, None, **extra)
    ours = _images(pipe_cls, model, ncp_lora=lora_dir, **extra)
    if targets == ATTENTION:
        np.testing.assert_allclose(_images(pipe_cls, model, lora_dir, **extra), ours, atol=1e-5, rtol=0)
    kohya = _images(pipe_cls, model, out, **extra)
    assert np.abs(ours - base).max() > 1e-3  # the LoRA changes the images
    np.testing.assert_allclose(kohya, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind, targets", [("sd15", ATTENTION), ("sdxl", ATTENTION), ("sdxl", ALL_LAYERS)])
def test_merged_pipeline_gives_base_plus_lora_images(kind, targets, tiny_sd15, tiny_sdxl, tmp_path):
    """The fused U-Net (W + alpha/r up @ down, float32) draws base + LoRA's images within 1e-4 (pixel
    values in [0, 1]; only the summation order differs)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    model = tiny_sdxl if kind == "sdxl" else tiny_sd15
    pipe_cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    lora_dir = _lora_run(model, kind, targets, tmp_path)
    merged = export_merged(lora_dir, str(model), tmp_path / "merged")
    extra = {} if kind == "sdxl" else {"safety_checker": None}
    with_lora = _images(pipe_cls, model, ncp_lora=lora_dir, **extra)
    fused = _images(pipe_cls, merged, None, **extra)
    assert not any("lora" in n for n, _ in pipe_cls.from_pretrained(str(merged)).unet.named_parameters())
    np.testing.assert_allclose(fused, with_lora, atol=1e-4, rtol=0)


def test_cli_reads_the_runs_model(tiny_sd15, tmp_path, capsys):
    """``python -m ncp.export RUN``: the LoRA from RUN/lora, the base model from the run's checkpoint config,
    the file beside the LoRA folder; bad input is a named error (exit 2)."""
    lora_dir = _lora_run(tiny_sd15, "sd15", ATTENTION, tmp_path)
    run = lora_dir.parent
    (run / "step-000001").mkdir()
    (run / "step-000001" / "config.json").write_text(json.dumps({"model": {"path": str(tiny_sd15)}}))
    assert main([str(run), "--dtype", "fp16"]) == 0
    from safetensors.torch import load_file

    state = load_file(str(run / "lora_kohya.safetensors"))
    assert all(v.dtype == torch.float16 for v in state.values())
    assert main([str(tmp_path / "nothing-here")]) == 2
    assert "no pytorch_lora_weights.safetensors" in capsys.readouterr().err


def _tree(folder):
    """{relative path: bytes} of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_merge_refuses_the_base_model_and_a_non_empty_folder(tiny_sd15, tmp_path, capsys):
    """``--merge`` onto the base model's folder, a folder inside it (also through a link) or any non-empty folder
    is a named error (exit 2) before anything is written: no kohya file, the model's files unchanged."""
    lora_dir = _lora_run(tiny_sd15, "sd15", ATTENTION, tmp_path)
    model_files = _tree(tiny_sd15)
    (tmp_path / "link").symlink_to(tiny_sd15)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    capsys.readouterr()  # the progress bars of building the LoRA
    for target, message in ((tiny_sd15, "is the base model's own folder"),
                            (tiny_sd15 / "unet", "is inside the base model's folder"),
                            (tmp_path / "link" / "unet", "is inside the base model's folder"),
                            (tmp_path / "link" / "new", "is inside the base model's folder"),
                            (mine, "exists and is not an empty folder")):
        assert main([str(lora_dir), "--model", str(tiny_sd15), "--merge", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --merge {target} {message}") and "\n" not in err
    assert _tree(tiny_sd15) == model_files and _tree(mine) == {"notes.txt": b"keep me"}
    assert not (lora_dir.parent / "lora_kohya.safetensors").exists()


def test_merge_writes_beside_the_target_and_renames_at_the_end(tiny_sd15, tmp_path, monkeypatch):
    """An export that dies before the rename leaves neither the target nor its temporary folder; an empty
    target folder is filled."""
    import ncp.files

    lora_dir = _lora_run(tiny_sd15, "sd15", ATTENTION, tmp_path)
    seen = []

    def dies(new, final):
        seen.append(sorted(p.name for p in new.iterdir()))
        raise KeyboardInterrupt

    monkeypatch.setattr(ncp.files, "replace_folder", dies)
    with pytest.raises(KeyboardInterrupt):
        export_merged(lora_dir, str(tiny_sd15), tmp_path / "merged")
    assert "unet" in seen[0] and "model_index.json" in seen[0]  # the pipeline was written, beside the target
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.tmp-*"))
    monkeypatch.undo()
    (tmp_path / "merged").mkdir()
    assert export_merged(lora_dir, str(tiny_sd15), tmp_path / "merged") == tmp_path / "merged"
    assert (tmp_path / "merged" / "unet").is_dir() and not list(tmp_path.glob(".merged.tmp-*"))


def test_a_lora_without_its_run_config_needs_model(tiny_sd15, tmp_path, capsys):
    """No step-*/config.json beside the LoRA folder: the base model is asked for, not assumed to be the
    bundled one."""
    lora_dir = _lora_run(tiny_sd15, "sd15", ATTENTION, tmp_path)
    capsys.readouterr()
    assert main([str(lora_dir)]) == 2
    err = capsys.readouterr().err
    assert "has no run config beside it" in err and "pass --model" in err
    assert not (lora_dir.parent / "lora_kohya.safetensors").exists()
    assert main([str(lora_dir), "--model", str(tiny_sd15)]) == 0
    assert (lora_dir.parent / "lora_kohya.safetensors").is_file()
