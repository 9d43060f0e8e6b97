"""Which resumes restore per-rank RNG states: only in the saving layout (mftune.trainer.resume.same_layout)."""


def test_rng_states_are_restored_only_in_the_saving_layout():
    from mftune.trainer.resume import ResumePoint, same_layout

    def point(files, layout):
        return ResumePoint(files, {}, 1, 4, 4, 4, 1.0, 0, 8, {}, layout)

    two = {"world_size": 2, "data_parallel": 2, "model_parallel": 1}
    assert same_layout(point(["a", "b"], two), two)
    assert not same_layout(point(["a", "b"], two), {"world_size": 2, "data_parallel": 1, "model_parallel": 2})
    assert not same_layout(point(["a"], two), two)  # one rank's file given as load_checkpoint
    assert same_layout(point(["a", "b"], None), two)  # older checkpoints: the number of files decides
