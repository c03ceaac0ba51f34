"""Shared fixtures (paths, a small synthetic corpus generated once per session) and the ``slow`` marks."""

import os
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

#: Under pytest-xdist (the README's ``-n auto``) every worker computes on one core, and so do
#: the recipe runs it starts (they inherit the variable): N workers share N cores instead of
#: each starting a thread per core. Set before anything imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

#: Options of the tiny corpus used by unit tests (a few seconds to synthesise).
TINY_CORPUS = dict(
    seed=7,
    n_train=24,
    n_dev_sentences=4,
    n_test_sentences=5,
    closed_vocabulary=False,
    n_train_speakers=6,
    n_unseen_speakers=2,
    n_unseen_variants=4,
)


@pytest.fixture(scope="session")
def repo_root():
    return ROOT


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """(folder, manifests) of a tiny synthetic corpus."""
    from earlyexit_brain.data.synthetic import prepare_synthetic

    folder = str(tmp_path_factory.mktemp("tiny_corpus"))
    manifests = prepare_synthetic(folder, num_workers=2, **TINY_CORPUS)
    return folder, manifests


@pytest.fixture
def free_port():
    """A TCP port free on this machine now (for a DDP rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The unit tests marked ``slow`` (``pytest -m "not slow"`` leaves them out), by module and function
#: (every parameter set); every test in tests/integration is slow too (each runs a recipe). Chosen with
#: ``pytest --durations=0`` on 2 shared CPU cores: the functions whose parameter sets took about 3 s or
#: more each (a training loop, a recipe or benchmark in a subprocess, an export, a beam search), so that
#: the rest runs in under 2 minutes. A name here that the module no longer has is an error.
SLOW = {
    "test_aed.py": [
        "test_training_lowers_the_joint_loss",
        "test_exported_aed_model_loads_and_transcribes",
        "test_policy_evaluation_records_each_exits_beam_search_hypothesis",
        "test_exported_model_with_a_fused_ngram_loads_and_uses_it",
        "test_the_cached_search_steps_like_the_stock_searcher",
        "test_joint_loss_is_the_weighted_sum_of_ctc_and_label_smoothed_ce",
        "test_fused_search_hypotheses_are_words_of_the_ngram",
        "test_padding_does_not_change_the_decoder_loss",
        "test_test_stage_reports_every_decoder_per_exit",
        "test_only_the_chosen_exits_decoder_and_layers_run",
        "test_decoder_shapes_shared_embedding_and_parameter_counts",
    ],
    "test_bad_inputs.py": [
        "test_transcribe_batch_reports_bad_rows_and_transcribes_the_others",
        "test_transcribe_command_reports_a_too_short_file_and_goes_on",
        "test_a_batch_without_bad_rows_is_unchanged",
        "test_publish_from_another_directory_resolves_the_experiment_paths",
        "test_min_samples_of_a_waveform_encoder",
        "test_transcribe_files_keeps_every_good_result_around_too_short_files",
    ],
    "test_benchmark.py": [
        "test_train_step_variants_match_base_and_are_tabulated",
        "test_compute_section_and_tables",
        "test_train_step_times_the_brains_fit_batch_with_the_loss_object",
        "test_cpu_peak_memory_of_a_training_step_in_a_child_process",
        "test_inference_section_times_the_fixed_and_the_scored_policy_paths",
    ],
    "test_config.py": ["test_recipe_fails_fast_naming_the_key"],
    "test_conformer.py": ["test_truncated_forward_equals_full_forward_prefix", "test_every_exit_gets_gradient"],
    "test_data_safety.py": [
        "test_the_synthetic_recipe_refuses_a_users_data_folder",
        "test_training_refuses_a_users_output_folder",
    ],
    "test_exits.py": [
        "test_utterances_leaving_the_batch_do_not_change_the_others",
        "test_dynamic_inference_never_runs_layers_above_the_deepest_needed_exit",
        "test_policy_forced_to_exit_k_equals_the_fixed_exit_k_path",
        "test_planned_policies_compute_only_the_exits_they_stop_at",
    ],
    "test_faults.py": [
        "test_checkpoints_saved_and_pruned_under_ddp_do_not_hang",
        "test_nonfinite_loss_batch_is_skipped_counted_and_logged",
        "test_training_stops_when_the_patience_is_exhausted",
    ],
    "test_hub.py": [
        "test_hub_id_loads_offline_from_the_cache",
        "test_validation_loads_both_interfaces",
        "test_transcribe_command_reports_bad_files_and_goes_on",
        "test_validation_failure_refuses_the_upload",
        "test_dry_run_makes_no_network_call",
        "test_upload_goes_through_hfapi_and_never_shows_the_token",
        "test_existing_repo_needs_exist_ok",
    ],
    "test_inference.py": [
        "test_simulated_policy_decisions_equal_a_real_dynamic_run",
        "test_posterior_nbest_policy_runs",
        "test_stock_speechbrain_encoder_asr_loads_the_folder",
    ],
    "test_loss_and_data.py": [
        "test_unfit_training_utterances_are_dropped_and_counted",
        "test_weights_scale_each_exit_and_zero_weight_cuts_its_gradient",
        "test_plain_sum_is_the_default_objective",
    ],
    "test_losses.py": [
        "test_brain_objective_is_unchanged_by_the_single_call",
        "test_distillation_waits_for_its_first_epoch",
        "test_brain_adds_the_weighted_distillation_only_when_asked",
    ],
    "test_onnx.py": ["test_a_graph_of_the_same_structure_takes_the_other_modules_weights"],
    "test_project.py": ["test_plot_keeps_matplotlib_debug_records_out_of_the_log"],
    "test_soak.py": ["test_soak_reports_memory_every_tenth"],
    "test_splitformer.py": [
        "test_the_incremental_path_gives_the_hidden_states_of_forward",
        "test_an_exported_splitformer_folder_transcribes",
        "test_an_utterance_gives_the_same_output_alone_and_padded_in_a_batch",
        "test_the_side_by_side_benchmark",
        "test_params_and_layers_to_each_exit_count_the_branches",
    ],
    "test_ssl_config.py": ["test_ssl_recipe_fails_fast_naming_the_key"],
    "test_ssl_encoder.py": [
        "test_truncated_forward_matches_full_model",
        "test_dynamic_inference_with_select",
        "test_training_controls_and_export_config",
    ],
    "test_synthetic.py": [
        "test_interrupted_generation_is_completed_not_trusted",
        "test_deterministic_for_a_seed_whatever_the_worker_count",
        "test_sentence_source_is_installed_and_clean",
        "test_unseen_voices_use_variants_never_used_in_training",
    ],
}


#: Fixtures that take a minute or more to build: every test that needs one is slow.
SLOW_FIXTURES = {"onnx_folder"}  # tests/unit/test_onnx.py: the ONNX export of the fixture model


#: The test files whose tests share the session fixture ``smoke_run`` (the smoke recipe trained
#: once): under pytest-xdist they run on one worker, which builds it once.
SMOKE_RUN_FILES = {"test_aed_recipe.py", "test_ddp.py", "test_publish.py", "test_recipe.py", "test_resume.py"}


#: Most workers ``-n auto`` starts: each imports torch and some run recipes (1-2 GB each).
MAX_AUTO_WORKERS = 4


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: pytest-xdist's own count (the cores, or ``PYTEST_XDIST_AUTO_NUM_WORKERS``), at
    most ``MAX_AUTO_WORKERS``."""
    from xdist.plugin import pytest_xdist_auto_num_workers as xdist_count

    return min(MAX_AUTO_WORKERS, xdist_count(config))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scheduler for ``-n`` (the README's test command): one work unit per test
    file (module fixtures built once), the ``SMOKE_RUN_FILES`` in one unit, sent in collection
    order (files with slow tests first: :func:`pytest_collection_modifyitems`). Another
    ``--dist`` than the default keeps pytest-xdist's own."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            path = nodeid.split("::", 1)[0]
            return "smoke_run" if os.path.basename(path) in SMOKE_RUN_FILES else path

    config.option.loadscopereorder = False  # keep the collection order
    return FileUnits(config, log)


def pytest_collection_modifyitems(config, items):
    """Mark every test in tests/integration, the unit tests in ``SLOW`` and those needing one of
    ``SLOW_FIXTURES`` as ``slow``; check ``SMOKE_RUN_FILES``; put the ``SMOKE_RUN_FILES`` first,
    then the other files with slow tests, then the rest (each in collection order), so that
    pytest-xdist's workers start on the long work and end on the short."""
    checked = set()
    for item in items:
        path = item.path
        names = SLOW.get(path.name, []) if path.parent.name == "unit" else []
        if path.name in SLOW and path not in checked:
            checked.add(path)
            missing = [name for name in names if not hasattr(item.module, name)]
            if missing:
                raise pytest.UsageError(f"tests/conftest.py SLOW names tests that {path.name} does not have: {missing}")
        if (
            path.parent.name == "integration"
            or getattr(item, "originalname", item.name) in names
            or SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
        ):
            item.add_marker(pytest.mark.slow)
        if "smoke_run" in getattr(item, "fixturenames", ()) and path.name not in SMOKE_RUN_FILES:
            raise pytest.UsageError(
                f"tests/conftest.py SMOKE_RUN_FILES lacks {path.name} ({item.name} needs smoke_run)"
            )
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: 0 if item.path.name in SMOKE_RUN_FILES else 1 if item.path in slow_files else 2)
