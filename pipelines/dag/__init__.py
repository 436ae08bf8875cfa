"""Pipelines as DAGs of content-keyed stages on Ray.

    spec.py     YAML specs: stages, inputs, typed settings, `--set` overrides
    stages.py   the stage table: each kind's config, its configure step and the job it wraps
    graph.py    stages, cache keys, output dirs, the workdir lock, running one stage
    runner.py   running a graph on Ray: scheduling, retries, failure isolation
    report.py   the report stage's tables and curves
    schedule.py cron lines and KubeRay RayCronJob manifests for `bertflow schedule`
"""
