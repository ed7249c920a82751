"""Kubeflow Pipelines (kfp v2) components of the lifecycle: each one a lightweight Python component whose body calls
the step of :mod:`pipeline.steps` through its adapter in :mod:`pipeline.adapters`, which turns kfp artifacts into
folders and back.

Artifacts, not copied paths, carry the work from step to step: the validated ``Dataset`` (its metadata: data
location, fingerprint, DVC / Git LFS version), the training run folder (a ``Model`` artifact holding the Hydra run
folder with ``run.json`` and checkpoints), the evaluation (``Artifact`` folder, ``HTML`` report, ``Metrics``,
``ClassificationMetrics`` with the ROC curve and confusion matrix) and the exported model version (a ``Model``
artifact: a copy of ``model_repository/<name>/<version>/`` with its lineage as metadata).

The bodies import nothing at module level (kfp ships only the function's source to the pod or subprocess); the
image has the project installed (``pip install -e ".[pipeline]"``), so ``pipeline.adapters`` imports there.
Cached steps (validate, train, evaluate) take no pipeline run id, so their cache key stays the same from one run to
the next; the first step after them (export) copies their entries into the pipeline record.
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

DEFAULT_IMAGE = "medops-train:latest"  # Dockerfile.gpu --target train; definition.build sets each step's image


# -- the components (their bodies are what kfp ships; keep them to an import and a call) -------------------------
@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def begin_op(records_dir: str, pipeline_run: str, job_id: str, engine: str, trigger: dict, data: str,
             data_version: str, train_overrides: list, model_name: str, eval_data: str, trial_mode: str,
             auto_promote: bool) -> str:
    """Open the pipeline run record (trigger, parameters)."""
    from pipeline.adapters import begin_impl

    return begin_impl(records_dir, pipeline_run, job_id, engine, trigger, {
        "data": data, "data_version": data_version, "train_overrides": train_overrides, "model_name": model_name,
        "eval_data": eval_data, "trial_mode": trial_mode, "auto_promote": auto_promote})


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def validate_op(data: str, data_version: str, data_config: str, data_overrides: list, dataset: Output[Dataset],
                report: Output[HTML]):
    """Data-quality checks (python -m datatools.validate_data); data_version keys the cache to the data's content."""
    from pipeline.adapters import validate_impl

    validate_impl(data, data_config, data_overrides, dataset, report)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def train_op(dataset: Input[Dataset], data_overrides: list, train_overrides: list, task_name: str,
             run: Output[Model], metrics: Output[Metrics]):
    """python -m train into the run artifact (GPU requested on a cluster)."""
    from pipeline.adapters import train_impl

    train_impl(dataset, data_overrides, train_overrides, task_name, run, metrics)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def evaluate_op(run: Input[Model], n_resamples: int, evaluation: Output[Artifact], report: Output[HTML],
                metrics: Output[Metrics], classification: Output[ClassificationMetrics]):
    """Clinical evaluation (python -m evaluation.evaluate): report, calibration, subgroups, ROC, confusion."""
    from pipeline.adapters import evaluate_impl

    evaluate_impl(run, n_resamples, evaluation, report, metrics, classification)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def export_op(dataset: Input[Dataset], run: Input[Model], evaluation: Input[Artifact], model_name: str,
              model_repository: str, export_overrides: list, records_dir: str, pipeline_run: str, job_id: str,
              model: Output[Model]):
    """python -m export (parity gate) into the model repository; the version as a model artifact with lineage."""
    from pipeline.adapters import export_impl

    export_impl(dataset, run, evaluation, model_name, model_repository, export_overrides, records_dir, pipeline_run,
                job_id, model)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def gate_op(model: Input[Model], eval_data: str, eval_split: str, tolerance: float, records_dir: str,
            pipeline_run: str, job_id: str, gate_metrics: Output[Metrics]) -> str:
    """The promotion gate against the production version on the fixed evaluation set: pass | refuse."""
    from pipeline.adapters import gate_impl

    return gate_impl(model, eval_data, eval_split, tolerance, records_dir, pipeline_run, job_id, gate_metrics)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def trial_op(model: Input[Model], mode: str, share: float, eval_data: str, eval_split: str, limits: dict,
             auto_promote: bool, triton_url: str, records_dir: str, pipeline_run: str, job_id: str,
             trial_metrics: Output[Metrics]) -> str:
    """Canary or shadow trial beside production, checked against limits: promote | wait | refuse."""
    from pipeline.adapters import trial_impl

    return trial_impl(model, mode, share, eval_data, eval_split, limits, auto_promote, triton_url, records_dir,
                      pipeline_run, job_id, trial_metrics)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def promote_op(model: Input[Model], eval_data: str, eval_split: str, tolerance: float, triton_url: str,
               records_dir: str, pipeline_run: str, job_id: str) -> str:
    """python -m serve promote: the version becomes production (gate applied again, recorded)."""
    from pipeline.adapters import promote_impl

    return promote_impl(model, eval_data, eval_split, tolerance, triton_url, records_dir, pipeline_run, job_id)


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def finalize_op(records_dir: str, pipeline_run: str, job_id: str, status: dsl.PipelineTaskFinalStatus) -> str:
    """Exit handler: the run's final status (completed, stopped by a gate, failed) into the pipeline record."""
    from pipeline.adapters import finalize_impl

    error = status.error_message if hasattr(status, "error_message") else ""
    return finalize_impl(records_dir, pipeline_run, job_id, status.state, error or "")
