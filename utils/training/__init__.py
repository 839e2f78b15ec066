"""Training any Method: flags in, a finished run folder out.

    flags.py         the scripts' flags and their checks, the device, AMP
    settings.py      the flags resolved once into RunSettings (data, loader, input, model, optimiser)
    trainer.py       the training loop and step; run(), the body of every training script
    run_folder.py    the run folder: chosen, checked, removed when a run fails before its first checkpoint
    state.py         what a checkpoint holds and how a trainer is put back in that state
    resume.py        the flags of a resumed run, the script that made a checkpoint, the command to go on
    records.py       what a run records: its configuration, flags, device, environment, file hashes
    checkpoint.py    checkpoint files (safe loading, one-line errors) and atomic writes
    stop_signals.py  stopping at a step on SIGINT/SIGTERM/SIGUSR1
    launch.py        torchrun with quiet exits on signals (`python -m utils.launch`)

Training never imports retrieval or the table.
"""
