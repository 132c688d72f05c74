import argparse

import pytest
import timm
import timm.data
import torch
from timm.models.vision_transformer import VisionTransformer

from rcmae.core import checkpoint as ck
from rcmae.core.optim import build_pretrain_optimizer
from rcmae.pretrain.models import build_mae, random_masking_ids


def micro():
    torch.manual_seed(0)
    return build_mae("vit_micro_patch8", 32, 32, 1, 2)


def test_atomic_save_pointer_and_retention(tmp_path):
    for step in (1, 2, 3, 4):
        path = ck.save_checkpoint({"step": step}, tmp_path, step, keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["checkpoint_00000003.pth",
                                                               "checkpoint_00000004.pth"]
    assert ck.find_last_checkpoint(tmp_path) == path
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "last_checkpoint").write_text("checkpoint_00000009.pth\n")
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.find_last_checkpoint(tmp_path)


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    ck.save_checkpoint({"step": 1}, tmp_path, 1, keep=2)

    def crash(obj, f):
        open(f, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint({"step": 2}, tmp_path, 2, keep=2)
    assert not list(tmp_path.glob("*.tmp"))  # the half-written file goes with the interrupted save
    assert ck.find_last_checkpoint(tmp_path).name == "checkpoint_00000001.pth"
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["checkpoint_00000001.pth"]


def test_reads_official_mae_and_rcmae_formats(tmp_path):
    model = micro()
    sd = model.state_dict()
    args = argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75)
    torch.save({"model": sd, "epoch": 3, "args": args}, tmp_path / "mae.pth")
    mae = ck.read_checkpoint(tmp_path / "mae.pth")
    assert mae.source == "mae" and mae.teacher is None and mae.student.keys() == sd.keys()
    assert mae.model("auto")[0] == "student"
    with pytest.raises(ck.CheckpointError, match="has no teacher"):
        mae.model("teacher")

    teacher = {k: v + 1 for k, v in sd.items()}
    torch.save({"student": {f"module.{k}": v for k, v in sd.items()}, "teacher": teacher,
                "student_without_ddp": sd, "teacher_without_ddp": teacher, "epoch": 5, "args": args},
               tmp_path / "rcmae.pth")
    rc = ck.read_checkpoint(tmp_path / "rcmae.pth")
    assert rc.source == "rcmae" and set(rc.student) == set(sd)
    assert torch.equal(rc.model("auto")[1]["cls_token"], sd["cls_token"] + 1)

    torch.save({"weights": sd, "epoch": 1}, tmp_path / "other.pth")
    with pytest.raises(ck.CheckpointError, match="not a ViT checkpoint.*weights"):
        ck.read_checkpoint(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        ck.read_checkpoint(tmp_path / "missing.pth")


def test_load_state_reports_and_rejects():
    model = micro()
    sd = dict(micro().state_dict())
    sd["head.weight"] = torch.zeros(3)
    with pytest.raises(ck.CheckpointError, match=r"unexpected keys \['head.weight'\]"):
        ck.load_state(model, sd, "x")
    sd.pop("head.weight")
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(5, 5)
    with pytest.raises(ck.CheckpointError, match="shape mismatch.*blocks.0.mlp.fc1.weight"):
        ck.load_state(model, sd, "x")
    sd = {k: v for k, v in micro().state_dict().items() if not k.startswith("decoder")}
    with pytest.raises(ck.CheckpointError, match="missing keys"):
        ck.load_state(model, sd, "x")
    report = ck.load_state(model, sd, "x", may_miss=lambda key: key.startswith("decoder"))
    assert "decoder_pred.weight" in report.missing and "blocks.0.attn.qkv.weight" in report.loaded


def test_official_optimizer_state_is_remapped_by_name():
    model = micro()
    params = dict(model.named_parameters())
    # timm 0.3.2 add_weight_decay, which both official codebases call: 1-d tensors and biases
    # first, then the rest, each in named_parameters order (fixed position embeddings left out)
    trainable = [n for n, p in params.items() if p.requires_grad]
    no_decay = [n for n in trainable if params[n].ndim <= 1 or n.endswith(".bias")]
    names = no_decay + [n for n in trainable if n not in no_decay]
    # an "official" optimizer: parameters in MAE's order, state tagged with each parameter's index
    official = torch.optim.AdamW([params[n] for n in names])
    official_sd = official.state_dict()
    official_sd["state"] = {i: {"step": torch.tensor(7.0), "exp_avg": torch.full_like(params[n], i),
                                "exp_avg_sq": torch.ones_like(params[n])}
                            for i, n in enumerate(names)}
    assert build_pretrain_optimizer(model, 0.05, (0.9, 0.95), "cpu")[1] == names  # default: official groups
    ours, our_names = build_pretrain_optimizer(model, 0.05, (0.9, 0.95), "cpu", decay_tokens=False)
    assert our_names != names  # cls/mask tokens change group: the order differs
    remapped = ck.remap_optimizer_state(official_sd, names, our_names, ours.state_dict())
    ours.load_state_dict(remapped)
    for n in names:
        assert torch.all(ours.state[params[n]]["exp_avg"] == names.index(n)), n


def test_exported_encoder_loads_into_timm_and_matches(tmp_path):
    model = micro()
    torch.save({"format": ck.FORMAT, "student": model.state_dict(),
                "teacher": {k: v * 0 for k, v in model.state_dict().items()}},
               tmp_path / "ours.pth")
    ck.export_encoder(tmp_path / "ours.pth", "student", tmp_path / "enc.pth")
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                            num_classes=0)
    vit.load_state_dict(torch.load(tmp_path / "enc.pth", weights_only=True)["model"])  # strict
    imgs = torch.randn(2, 3, 32, 32)
    ids_keep, _, _ = random_masking_ids(torch.arange(16.0).expand(2, -1), 0.0)  # keep all, in order
    torch.testing.assert_close(model.forward_encoder(imgs, ids_keep), vit.forward_features(imgs))
    ck.export_encoder(tmp_path / "ours.pth", "teacher", tmp_path / "enc_t.pth")
    assert torch.all(torch.load(tmp_path / "enc_t.pth", weights_only=True)["model"]["cls_token"] == 0)


@pytest.mark.parametrize("origin", ["ours", "mae", "rcmae"])
def test_export_is_a_timm_folder_with_the_right_preprocessing(tmp_path, origin):
    """timm.create_model("local-dir:...", pretrained=True) rebuilds the encoder with our weights and the
    preprocessing they were trained with (not vit_*_224's default tag: mean / std 0.5, crop 0.9)."""
    torch.manual_seed(0)
    model = build_mae("vit_tiny_patch16", 224, 32, 1, 2)
    sd = model.state_dict()
    if origin == "ours":
        state = {"format": ck.FORMAT, "arch": "vit_tiny_patch16", "step": 5, "student": sd, "teacher": sd}
    elif origin == "mae":
        state = {"model": sd}
    else:
        state = {"student": {f"module.{k}": v for k, v in sd.items()}, "teacher": sd}
    torch.save(state, tmp_path / "src.pth")
    out = ck.export_encoder(tmp_path / "src.pth", "auto", tmp_path / "enc.pth")
    assert torch.load(out, weights_only=True)["meta"]["arch"] == "vit_tiny_patch16"
    vit = timm.create_model(f"local-dir:{tmp_path / 'enc'}", pretrained=True)
    data = timm.data.resolve_data_config({}, model=vit)
    assert (tuple(data["mean"]), tuple(data["std"])) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert data["crop_pct"] == 0.875 and data["interpolation"] == "bicubic" and data["input_size"] == (3, 224, 224)
    assert vit.num_classes == 0
    imgs = torch.randn(1, 3, 224, 224)
    ids_keep, _, _ = random_masking_ids(torch.arange(196.0).expand(1, -1), 0.0)
    torch.testing.assert_close(vit.forward_features(imgs), model.forward_encoder(imgs, ids_keep))




def test_fixed_position_embeddings_are_recomputed_only_where_declared():
    small, big = micro(), build_mae("vit_micro_patch8", 48, 32, 1, 2)
    sd = small.state_dict()
    with pytest.raises(ck.CheckpointError, match=r"shape mismatch \['pos_embed: checkpoint \(1, 17, 32\)"):
        ck.load_state(big, sd, "x")  # undeclared: another size is an error, never skipped silently
    before = big.pos_embed.clone()
    report = ck.load_state(big, sd, "x", recompute=ck.FIXED_KEYS)
    assert report.recomputed == ["pos_embed", "decoder_pos_embed"] and torch.equal(big.pos_embed, before)
    assert torch.equal(big.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)
    assert "recomputed 2 (pos_embed, decoder_pos_embed)" in report.summary()


def test_disk_full_while_saving_names_the_file_and_the_space(tmp_path, monkeypatch):
    """ENOSPC from the write: the partial .tmp is removed, the previous checkpoint stays the last one, and
    the error says which file and how much space was free against what the checkpoint needs."""
    import errno

    ck.save_checkpoint({"step": 1}, tmp_path, 1, keep=2)

    def full(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    state = {"step": 2, "weights": torch.zeros(1000)}  # 4,000 bytes of tensors
    with pytest.raises(ck.CheckpointError) as e:
        ck.save_checkpoint(state, tmp_path, 2, keep=2)
    message = str(e.value)
    assert str(tmp_path / "checkpoint_00000002.pth") in message and "no space left" in message.lower()
    assert "free" in message and "needs about 4.0 kB" in message
    assert not list(tmp_path.glob("*.tmp"))
    assert ck.find_last_checkpoint(tmp_path).name == "checkpoint_00000001.pth"
