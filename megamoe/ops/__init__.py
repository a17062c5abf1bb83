"""The operations side of megamoe: everything between a user's sbatch script and the trainer.

    slurm.py       what a Slurm job is: its environment variables and an sbatch header
    script.py      reads an sbatch script or a config without running it (the trainer's flags)
    memory.py      bytes per GPU of weights, gradients and optimizer state for a layout
    estimate.py    the guide's estimation of steps, tokens and wall time
    checklist.py   the guide's checklist as a pre-flight report (`megamoe check`)
    launcher.py    sbatch -> srun -> torchrun (scripts/launch.sh, `megamoe launch`)

Modules import downward only (this list from the top: later ones may import earlier ones, never
the other way), and the library (model, data, train, ...) never imports this package.
"""
