"""Training any Method: flags in, a finished run folder out.

    flags.py         the scripts' flags and their checks, the device, AMP
    trainer.py       the training loop and step; run(), the body of every training script
    run_state.py     the run folder, what a checkpoint holds, resume
    checkpoint.py    checkpoint files and atomic writes
    stop_signals.py  stopping at a step on SIGINT/SIGTERM/SIGUSR1
    launch.py        torchrun with quiet exits on signals (`python -m utils.launch`)

Training never imports retrieval or the table.
"""
