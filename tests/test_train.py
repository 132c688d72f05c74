import json
import os
import re
import socket

import pytest
import torch
import torch.multiprocessing as mp
from fixtures import micro_config
from PIL import Image

from rcmae.core.checkpoint import find_last_checkpoint, list_checkpoints, read_checkpoint
from rcmae.core.errors import ConfigError, NonFiniteLossError
from rcmae.pretrain.train import main


def weights(out_dir):
    return torch.load(find_last_checkpoint(out_dir), map_location="cpu", weights_only=True)


def assert_same_state(a, b, exact=True):
    for part in ("student", "teacher"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            if exact:
                assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
            else:
                torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-5, atol=1e-6)


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_exact(micro_cfg, tmp_path):
    straight = main(micro_cfg(out="straight"))
    assert straight["step"] == 12
    main(micro_cfg("train.stop_at_step=5", out="split"))
    assert read_checkpoint(find_last_checkpoint(tmp_path / "split")).raw["step"] == 5
    resumed = main(micro_cfg(out="split"))  # auto-resume from the output dir
    assert resumed["step"] == 12
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert_same_state(a, b)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the momentum schedule continued on the global step after the resume
    m = {r["step"]: r["momentum"] for r in metrics(tmp_path / "split")}
    m_straight = {r["step"]: r["momentum"] for r in metrics(tmp_path / "straight")}
    assert m[6] == m_straight[6] and 0.996 < m[6] < 1
    assert len(list_checkpoints(tmp_path / "split")) == 2  # retention: keep = 2


def test_official_schedule_resumes_exactly_after_an_epochs_leftover_micro_batch(micro_cfg, tmp_path):
    """36 images in micro-batches of 4 with accumulation 2: the official schedule's 9th micro-batch of each
    epoch moves the teacher after step 4; a run stopped there and resumed equals the straight run."""
    layout = ("rcmae.momentum_schedule=official", "data.synthetic_size=36", "train.micro_batch=4", "optim.epochs=2")
    main(micro_cfg(*layout, out="straight"))
    main(micro_cfg(*layout, "train.stop_at_step=4", out="split"))
    main(micro_cfg(*layout, out="split"))
    assert_same_state(weights(tmp_path / "straight"), weights(tmp_path / "split"))


def test_gradient_accumulation_matches_full_batch(micro_cfg, tmp_path):
    main(micro_cfg("optim.epochs=1", out="full"))
    main(micro_cfg("optim.epochs=1", "train.micro_batch=4", out="accum"))
    assert_same_state(weights(tmp_path / "full"), weights(tmp_path / "accum"), exact=False)


def _ddp_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    main(micro_config(out_dir, ["optim.epochs=1", "train.micro_batch=4"]))


def test_two_process_ddp_matches_one_process(micro_cfg, tmp_path):
    main(micro_cfg("optim.epochs=1", out="single"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path / "ddp")), nprocs=2, join=True)
    single, ddp = weights(tmp_path / "single"), weights(tmp_path / "ddp")
    assert single["step"] == ddp["step"] == 4
    assert_same_state(single, ddp, exact=False)
    assert metrics(tmp_path / "ddp")[-1]["loss"] == pytest.approx(
        metrics(tmp_path / "single")[-1]["loss"], rel=1e-5)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(micro_cfg, tmp_path):
    cfg = micro_cfg("optim.lr=1e12", "optim.warmup_epochs=0", "checkpoint.every_steps=1",
                    "log.every_steps=100", out="nan")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at iteration \d+") as e:
        main(cfg)
    bad_step = int(str(e.value).split("iteration ")[1].split()[0])
    last = weights(tmp_path / "nan")
    assert last["step"] <= bad_step  # saved before the bad step ran
    assert all(torch.isfinite(v).all() for v in last["student"].values())


def test_corrupt_images_are_skipped_and_counted(micro_cfg, tmp_path):
    root = tmp_path / "images"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (40, 40), (i * 30, 60, 90)).save(root / cls / f"{i}.jpg")
    (root / "a" / "3.jpg").write_bytes(b"not a jpeg at all")
    (root / "b" / "5.jpg").write_bytes(b"")
    cfg = micro_cfg("data.source=folder", f"data.path={root}", "optim.epochs=1", "log.every_steps=1",
                    out="corrupt")
    assert main(cfg)["step"] == 2
    assert sum(r["skipped_images"] for r in metrics(tmp_path / "corrupt")) == 2


def test_init_from_encoder_only_checkpoint_reports_missing(micro_cfg, tmp_path, capsys):
    main(micro_cfg("optim.epochs=1", out="src"))
    ck = read_checkpoint(find_last_checkpoint(tmp_path / "src"))
    enc = {k: v for k, v in ck.student.items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": enc}, tmp_path / "mae_encoder.pth")
    capsys.readouterr()
    main(micro_cfg("optim.epochs=1", f"train.init={tmp_path / 'mae_encoder.pth'}", out="init"))
    out = capsys.readouterr().out
    assert "train.init student: loaded 30 tensors; left at initialisation" in out
    assert "decoder_pred.*" in out


def test_resume_from_official_rcmae_checkpoint(micro_cfg, tmp_path):
    """An official RC-MAE file (module. prefixes, MAE optimizer order, epoch) resumes at the next epoch."""
    main(micro_cfg("optim.epochs=1", "optim.decay_tokens=false", out="src"))
    ours = read_checkpoint(find_last_checkpoint(tmp_path / "src")).raw
    names = ours["optimizer_param_names"]
    from rcmae.pretrain.models import build_mae
    params = [(n, p) for n, p in build_mae("vit_micro_patch8", 32, 32, 1, 2).named_parameters() if p.requires_grad]
    no_decay = [n for n, p in params if p.ndim <= 1 or n.endswith(".bias")]  # timm 0.3.2 add_weight_decay
    official_order = no_decay + [n for n, _ in params if n not in no_decay]
    assert official_order != names  # optim.decay_tokens=false: the remap by name is exercised
    opt = ours["optimizer"]
    flat = [i for g in opt["param_groups"] for i in g["params"]]
    by_name = {n: opt["state"][i] for n, i in zip(names, flat)}
    official_opt = {"state": {i: by_name[n] for i, n in enumerate(official_order)},
                    "param_groups": [{**opt["param_groups"][0], "params": list(range(len(official_order)))}]}
    torch.save({"student": {f"module.{k}": v for k, v in ours["student"].items()},
                "teacher": ours["teacher"], "optimizer": official_opt, "epoch": 0, "scaler": None},
               tmp_path / "official.pth")
    out = main(micro_cfg("optim.epochs=2", "optim.decay_tokens=false", f"train.resume={tmp_path / 'official.pth'}",
                         out="cont"))
    assert out["step"] == 8
    # same as continuing our own checkpoint
    main(micro_cfg("optim.epochs=2", "optim.decay_tokens=false",
                   f"train.resume={find_last_checkpoint(tmp_path / 'src')}", out="ref"))
    assert_same_state(weights(tmp_path / "cont"), weights(tmp_path / "ref"))


def test_tensorboard_and_reconstruction_figure(micro_cfg, tmp_path):
    out = main(micro_cfg("optim.epochs=1", "log.tensorboard=true", "log.recon_every_epochs=1",
                         "log.recon_images=2", out="tb"))
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    assert out["reconstruction"].endswith("reconstruction_epoch0001.png")
    assert Image.open(out["reconstruction"]).size[0] > 200
    rec = metrics(tmp_path / "tb")[-1]
    assert {"loss", "recon", "consistency", "lr", "momentum", "img_per_s", "mem_gb"} <= rec.keys()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_and_clipping_run(micro_cfg, tmp_path, precision):
    out = main(micro_cfg("optim.epochs=1", f"train.precision={precision}", "optim.clip_grad=1.0",
                         out=precision))
    rec = metrics(tmp_path / precision)[-1]
    assert out["step"] == 4 and 0 < rec["loss"] < 10 and rec["grad_norm"] > 0
    state = weights(tmp_path / precision)
    assert (state["scaler"] is not None) == (precision == "fp16")
    assert all(v.dtype == torch.float32 for v in state["student"].values())  # master weights stay fp32


def test_wandb_logs_offline_and_a_resumed_run_continues_the_same_wandb_run(micro_cfg, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    inits, logged = [], []
    real_init, real_log = wandb.init, wandb.sdk.wandb_run.Run.log
    monkeypatch.setattr(wandb, "init", lambda **kw: inits.append(kw) or real_init(**kw))
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", lambda run, data, *a, **kw: (logged.append(dict(data)),
                                                                                     real_log(run, data, *a, **kw)))
    args = ("optim.epochs=2", "log.every_steps=1", "log.wandb=offline", "log.wandb_project=unit")
    main(micro_cfg(*args, "train.stop_at_step=2"))
    main(micro_cfg(*args))
    out = tmp_path / "run"
    run_id = (out / "wandb_id").read_text().strip()
    assert [(i["id"], i["mode"], i["project"], i["resume"]) for i in inits] == [(run_id, "offline", "unit", "allow")] * 2
    assert inits[0]["config"]["log"]["wandb"] == "offline" and inits[0]["dir"] == out
    # one offline run folder per start (W&B adds "-1" when two starts fall in one second), all of the one run id
    folders = [f.name for f in (out / "wandb").glob("offline-run-*")]
    name = rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?"
    assert len(folders) == 2 and all(re.fullmatch(name, f) for f in folders)
    # every metrics.jsonl line reaches W&B, with the step as x axis
    lines = metrics(out)
    assert [r["step"] for r in logged] == [r["step"] for r in lines]
    assert all(r["pretrain/loss"] == line["loss"] for r, line in zip(logged, lines) if "loss" in line)


def test_wandb_options_are_checked_before_any_work(micro_cfg, monkeypatch):
    import sys

    with pytest.raises(ConfigError, match="log.wandb must be one of"):
        main(micro_cfg("log.wandb=cloud"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(ConfigError, match=r"pip install 'rcmae-toolkit\[wandb\]'"):
        main(micro_cfg("log.wandb=online"))
