"""OpenAI's files and fine-tuning jobs on the resident model: uploaded JSONL files, job records that API
replicas and training workers share through the store, and the worker that trains prompt sets.

files.py, jobs.py and data_files.py hold no tensors (the HTTP layer uses them through the service);
runner.py and worker.py train, in the worker process only."""
