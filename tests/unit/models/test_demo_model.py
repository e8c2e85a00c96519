"""valve-model demo-model: what it refuses before rendering (a novel --mix) or training (unlabelled slices)."""

import pytest

from models import demo_model


@pytest.mark.parametrize("mix", ["good=0.5,novel=0.5", "good=0.1,dirt=0.3,scratch=0.3,ec=0.2,dent=0.1", "chip=1"])
def test_demo_model_refuses_novel_defects_in_its_mix(tmp_path, mix):
    """A --mix with novel or a novel subtype stops demo-model before it renders, naming the problem and the fix."""
    work = tmp_path / "work"
    with pytest.raises(SystemExit, match=r"contains .*novel defect types are held out.*Fix: use only good, dirt, "
                                         r"scratch, ec"):
        demo_model.main(["--work", str(work), "--mix", mix, "--no-ship"])
    assert not work.exists()


def test_demo_model_mix_check_passes_trained_classes_and_refuses_unknown_names():
    """The default mix and a zero novel weight pass; an unknown name is refused with synth's message."""
    demo_model.check_mix(demo_model.DEFAULT_MIX)
    demo_model.check_mix("good=1,novel=0")
    with pytest.raises(SystemExit, match="demo-model: --mix: unknown class 'rust'"):
        demo_model.check_mix("rust=1")


def test_demo_model_stops_when_its_frames_give_unlabelled_slices(tmp_path, monkeypatch):
    """Frames whose manifest.jsonl is gone give unlabelled slices, and demo-model stops before training."""
    import service.sim.synth as synth

    render = synth.write_dataset

    def render_without_manifest(out, parts, **kwargs):
        rows = render(out, parts=2, **kwargs)
        (out / "manifest.jsonl").unlink()
        return rows

    def must_not_train(*args, **kwargs):
        raise AssertionError("demo-model went on to balance and train on unlabelled slices")

    monkeypatch.setattr(synth, "write_dataset", render_without_manifest)
    monkeypatch.setattr(demo_model, "balance_good", must_not_train)
    with pytest.raises(SystemExit, match=r"frames-train gave unlabelled slices: its manifest.jsonl was not found"):
        demo_model.main(["--work", str(tmp_path / "work"), "--no-ship"])


def test_demo_model_trains_with_the_shipped_models_recipe_by_default(tmp_path):
    """The default recipe is the one the shipped model.json records (its 10 % validation split, the paper's
    optimiser, batch and augmentation), with the options that record predates set to what that code did:
    constant learning rate, natural sampling, no BN recalibration, fp32; --recipe train-defaults is
    `valve-model train`'s recipe unchanged."""
    import json

    from models.train import TrainConfig

    recorded = json.loads((demo_model.SHIPPED_DIR / "model.json").read_text())["training"]["train"]
    args = demo_model.build_parser().parse_args(["--work", str(tmp_path)])
    cfg = demo_model.training_config(args, tmp_path, [])
    for key in ("val_fraction", "epochs", "batch_size", "lr", "seed", "augment", "attention", "preset"):
        assert getattr(cfg, key) == recorded[key], key
    assert list(cfg.betas) == recorded["betas"]
    assert (cfg.schedule, cfg.balance, cfg.bn_recal, cfg.precision) == ("constant", False, 0, "fp32")
    defaults = TrainConfig(data=tmp_path, out=tmp_path)
    other = demo_model.training_config(demo_model.build_parser().parse_args(["--recipe", "train-defaults"]),
                                       tmp_path, [])
    for key in ("val_fraction", "schedule", "balance", "bn_recal", "precision", "stem_init"):
        assert getattr(other, key) == getattr(defaults, key), key
    assert any(getattr(other, k) != getattr(cfg, k) for k in ("val_fraction", "schedule", "balance"))
    # the shipped model's stem as it was drawn; train-defaults' identity stem, except when resuming a run
    # written before the option: what the recipe leaves to the defaults resumes as the run was trained, as
    # `valve-model train --resume` does (drawn stem; a run without "bn_recal" recorded had none)
    assert (cfg.stem_init, other.stem_init) == ("drawn", "identity")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"train": {"schedule": "cosine"}}))
    resumed = demo_model.training_config(
        demo_model.build_parser().parse_args(["--recipe", "train-defaults", "--resume"]), tmp_path, [])
    assert (resumed.stem_init, resumed.schedule, resumed.bn_recal) == ("drawn", "cosine", 0)
    shipped = demo_model.training_config(demo_model.build_parser().parse_args(["--resume"]), tmp_path, [])
    assert (shipped.stem_init, shipped.schedule, shipped.epochs) == ("drawn", "constant", 100)  # the recipe's
