"""Airflow DAG: the nightly enrich job (configs/nightly.toml) as a TaskFlow task.

Copy this file into your DAGs folder (or point ``[core] dags_folder`` at
configs/). It needs ``enrich`` installed in the workers' environment
(``pip install enrich-llm`` or ``pip install -e /path/to/repo``) and the API key in
the workers' environment (``OPENAI_API_KEY``, or the variable the config's
``model.api_key_env`` names). Tested for real by ``.ci/airflow-check``
(``airflow dags test enrich_nightly`` against the local simulator).

Where things are, each from an environment variable or else an Airflow
Variable (Admin -> Variables), else the default:

    ENRICH_DATA_DIR  / enrich_data_dir   the job's folder (the `cd /data` of the
                                         cron line); relative paths in the config
                                         are relative to it [the repo root]
    ENRICH_CONFIG    / enrich_config     config file [DATA_DIR/configs/nightly.toml]
    ENRICH_INPUT     / enrich_input      overrides input.path
    ENRICH_OUTPUT    / enrich_output     overrides output.path
    ENRICH_BASE_URL  / enrich_base_url   overrides model.base_url
    ENRICH_MODEL     / enrich_model      overrides model.name

Failures: a bad config or input, a rejected key or unknown model, a spend cap,
or too many failed rows fail the task at once (retrying would fail again or
spend again); an interruption, an API unreachable for longer than max_outage_s
(exit 75) or another run holding the lock is retried, and the retry resumes
from the checkpoint.

The same job as a BashOperator (the CLI's exit codes decide the task state;
see the README's exit code table):

    from airflow.providers.standard.operators.bash import BashOperator

    BashOperator(
        task_id="enrich",
        bash_command=(
            "cd /data && enrich run configs/nightly.toml --quiet --log-format json --max-cost 25"
        ),
        env={"OPENAI_API_KEY": "{{ conn.openai.password }}"},
        append_env=True,
        retries=2,
    )
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import dag, task

DAG_ID = "enrich_nightly"

# Exit codes (see the README) that a retry cannot fix: bad config/input (2),
# rejected key/unknown model/no quota (3), spend cap reached (5).
# Bad usage, a rejected key, the spend cap, failed rows above max_error_rate
# (enrich() raises TooManyFailedRows, exit code 1): a retry would end the same way.
NOT_RETRYABLE = frozenset({1, 2, 3, 5})

log = logging.getLogger(__name__)


def _setting(name: str) -> str | None:
    """ENRICH_<NAME> from the environment, else the Airflow Variable enrich_<name>."""
    value = os.environ.get(f"ENRICH_{name.upper()}")
    if value:
        return value
    from airflow.sdk import Variable

    try:
        found = Variable.get(f"enrich_{name}", default=None)
    except Exception:  # no metadata DB reachable (e.g. parsing a copy): use the default
        return None
    return str(found) if found else None


def _under(base: Path, path: Path) -> Path:
    return path if path.is_absolute() else base / path


@dag(
    dag_id=DAG_ID,
    schedule="15 2 * * *",
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["enrich"],
    doc_md=__doc__,
)
def enrich_nightly() -> None:
    @task(retries=2, retry_delay=timedelta(minutes=10), execution_timeout=timedelta(hours=8))
    def enrich_dataset() -> dict[str, Any]:
        # Imported in the task, not at parse time: the scheduler parses this
        # file often and must not pay for (or fail on) the pipeline's imports.
        from airflow.sdk.exceptions import AirflowFailException

        from pipeline import EnrichError, enrich, load_config

        data_dir = Path(_setting("data_dir") or Path(__file__).resolve().parent.parent)
        config_file = Path(_setting("config") or data_dir / "configs" / "nightly.toml")
        overrides: dict[str, Any] = {
            "input.path": _setting("input"),
            "output.path": _setting("output"),
            "model.base_url": _setting("base_url"),
            "model.name": _setting("model"),
        }
        # A task's working directory is arbitrary: resolve the config's
        # relative paths against the job's folder, as `cd /data` does for cron.
        config = load_config(config_file, overrides)
        overrides["input.path"] = _under(data_dir, config.input.path)
        overrides["output.path"] = _under(data_dir, config.output.path)
        config = load_config(config_file, overrides)
        config.output.path.parent.mkdir(parents=True, exist_ok=True)
        # The HTTP client logs every request at INFO: a million rows would be a
        # million lines in the task log. Retries and failures still show.
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)

        try:
            summary = enrich(config)
        except EnrichError as error:
            if error.exit_code in NOT_RETRYABLE:
                raise AirflowFailException(
                    f"enrich failed (exit code {error.exit_code}): {error.message}"
                ) from None
            raise
        result = {
            "output": str(summary.output),
            "rows": summary.rows,
            "ok": summary.ok,
            "error": summary.error,
            "skipped": summary.skipped,
            "prompt_tokens": summary.prompt_tokens,
            "completion_tokens": summary.completion_tokens,
            "wall_s": round(summary.wall_s, 3),
        }
        log.info("enrich finished: %s", result)
        # Returned as the task's XCom, for downstream tasks (load, notify...).
        return result

    enrich_dataset()


enrich_nightly()
