"""The benchmark (python -m app.bench): one module per measurement, each a worker that runs
under horovodrun, mpirun or torchrun where it needs ranks, and the code that launches it."""
