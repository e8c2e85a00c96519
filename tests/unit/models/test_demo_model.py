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
