from smop.run import run


def test_fast_dev_run_default(make_cfg):
    cfg = make_cfg("trainer.fast_dev_run=true", "dataset=synthetic_mixture")
    results = run(cfg)
    assert results["status"] == "completed"
