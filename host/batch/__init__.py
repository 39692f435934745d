"""Batch jobs: thousands of tasks from a CSV, JSONL or JSON file, resumable, in this process or on Ray.

    inputs.py      rows of the file, --set defaults, the prompt template
    plan.py        every row validated before any model loads; seed and id fixed; what a re-run skips; order
    manifest.py    one JSON line per finished task, appended atomically, locked for one run
    execute.py     one task -> encoded image files (the same code in this process and on a Ray worker)
    commit.py      the driver places each file once and records it
    embedded.py    the default runner: one process, one model kept loaded
    ray_runner.py  Ray actors (one per GPU, or --workers N on CPUs), results streamed back to the driver
    progress.py    images/min, ETA and the summary
    job.py         the whole job; cli.py its flags
"""
