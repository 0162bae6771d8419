"""The README's list of every bad input and fault the tests try, what the user gets, and what is lost: generated
from the tests' own cases (tests/test_config.py, tests/test_prompts.py) and the faults below.

    python tests/bad_inputs.py    # rewrite the README's section (tests/test_config.py checks that it is current)
"""
import re
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "src")]
from dmdr.config import dotted  # noqa: E402

README = Path(__file__).parents[1] / "README.md"
BEGIN, END = "<!-- bad-inputs:begin -->", "<!-- bad-inputs:end -->"

# (what happens, what the user gets, the test that does it); nothing computed is lost in any of them
FAULTS = [
    ("`dvc repro` killed with SIGKILL in the middle of a recipe's training",
     "the next `dvc repro` resumes from the last checkpoint and ends bit-identical to an uninterrupted run",
     "test_pipeline.py::test_a_killed_run_resumes_and_two_fresh_runs_give_identical_results"),
    ("a stage's run killed with SIGKILL after its old outputs were set aside",
     "the next run of the stage puts them back first (a failure then keeps them)",
     "test_stage_outputs.py::test_a_killed_run_s_outputs_are_put_back_by_the_next_run"),
    ("a stage that fails while it runs (a prompt file broken after it was read once)",
     "`<stage> failed: its executed notebook is runs/failed/...`; its last outputs back in place",
     "test_pipeline.py::test_a_bad_parameter_or_a_failed_stage_loses_nothing"),
    ("a typo in params.yaml (an edit), then `dvc repro -f`",
     "the key, and `changed since the last commit`; every stage stops before it touches anything",
     "test_pipeline.py::test_a_bad_parameter_or_a_failed_stage_loses_nothing"),
    ("`dvc exp run -S distill.t_min=0.99` (against t_max 0.98)",
     "`distill.t_min, distill.t_max: t_min must be below t_max`, naming `dvc exp run -S distill.t_min`",
     "test_pipeline.py::test_a_bad_parameter_or_a_failed_stage_loses_nothing"),
    ("`dvc exp run -S recipes.dmdr-4.steps=3` (DVC rewrites params.yaml, unquoting `no` and `off`)",
     "only that recipe, its evaluation and the report rerun; `dvc exp show` and `dvc metrics diff` show the change",
     "test_pipeline.py::test_dvc_exp_run_with_a_changed_parameter_reruns_what_it_changes"),
    ("one NaN weight in the hps reward model",
     "`results/metrics/dmdr-4.json: hps is nan, not a finite number: not written`; its old metrics, samples and "
     "notebook stay",
     "test_pipeline.py::test_a_poisoned_reward_model_stops_its_evaluation_and_keeps_the_metrics"),
    ("a checkpoint file cut in half (each of model, fake score, optimizer, RNG states, loop.json, generators)",
     "`checkpoint ... is broken (<file>: ...): set aside as ....broken; the run starts over`",
     "test_reliability.py::test_a_truncated_checkpoint_is_set_aside_and_the_run_starts_over"),
    ("a second run of a stage while one runs",
     "`stage <name> is already running (pid N, started ...)`, at once",
     "test_stage_outputs.py::test_a_second_run_of_a_stage_fails_at_once_naming_the_first"),
    ("a checkpoint of other settings, other prompts, or another teacher or reward",
     "`ignoring checkpoint ...: it belongs to other settings`; the run starts over",
     "test_reliability.py::test_a_checkpoint_of_other_settings_is_not_resumed, "
     "::test_a_checkpoint_of_other_training_prompts_is_not_resumed"),
    ("a non-finite loss, once or `max_nonfinite` times in a row",
     "the update is skipped and counted; in a row: the run stops, its last checkpoint kept",
     "test_reliability.py::test_a_nonfinite_loss_skips_its_step_and_is_counted, "
     "::test_repeated_nonfinite_losses_stop_the_run_and_keep_the_checkpoint"),
    ("a model with a non-finite weight at a checkpoint", "the good checkpoint is not replaced",
     "test_reliability.py::test_poisoned_weights_are_never_checkpointed"),
]

OTHER_FILES = [  # bad prompt files tested outside test_prompts.MALFORMED
    ("latin.txt", "a Latin-1 byte on line 2", "latin.txt:2: not UTF-8"),
    ("latin.csv", "a Latin-1 byte on line 3", "latin.csv:3: not UTF-8"),
    ("image.png", "a PNG image", "image.png:1: not UTF-8"),
    ("a directory", "(a directory)", "<dir>: is a directory, not a prompt file"),
    ("big.csv", "a 200,000-character field on line 3", "big.csv:3: field larger than field limit"),
    ("nope.txt", "(missing)", "no such prompt file"),
]


def _value(v) -> str:
    return {float("inf"): ".inf", float("-inf"): "-.inf"}.get(v, ".nan" if v != v else repr(v)) \
        if isinstance(v, float) else str(v)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")


def _plain(regex: str) -> str:
    return re.sub(r"\\(.)", r"\1", regex)


def section() -> str:
    from test_config import BAD, BAD_SETS
    from test_prompts import MALFORMED
    rows = [f"<details><summary>Every bad input and fault the tests try: {len(BAD)} bad values in params.yaml, "
            f"{len(BAD_SETS)} --set assignments, {len(MALFORMED) + len(OTHER_FILES)} bad prompt files, "
            f"{len(FAULTS)} faults (generated by <code>python tests/bad_inputs.py</code>)</summary>", "",
            "A bad parameter stops every stage before it touches anything: nothing is lost. A bad prompt file fails "
            "its stage while it runs: the stage's last outputs are put back.", "",
            "| params.yaml given | what you get |", "|---|---|"]
    rows += [f"| `{_cell(', '.join(f'{k}: {_value(v)}' for k, v in dotted(change).items()) or str(change))}` | "
             f"`{_cell(message)}` |" for change, message in BAD]
    rows += ["", "| `--set` given | what you get |", "|---|---|"]
    rows += [f"| `{_cell(' '.join(sets))}` | `{_cell(message)}` |" for sets, message in BAD_SETS]
    rows += ["", "| prompt file | content | what you get |", "|---|---|---|"]
    rows += [f"| `{name}` | `{_cell(content[:60])}` | `{_cell(_plain(match))}` |"
             for name, content, match in MALFORMED + OTHER_FILES]
    rows += ["", "| fault | what you get | test |", "|---|---|---|"]
    rows += [f"| {what} | {got} | `{test}` |" for what, got, test in FAULTS]
    return "\n".join(rows + ["", "</details>"])


def readme_with_section(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{section()}\n{END}{tail}"


if __name__ == "__main__":
    README.write_text(readme_with_section(README.read_text()))
