"""The run engine under the three trainers: the run folder, its metrics log and its curves."""
