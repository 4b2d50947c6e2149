"""The Typer application object every command module registers on."""

import typer

app = typer.Typer(
    name="bladdergen",
    help=(
        "Synthetic 3D bladder CT by latent diffusion, and few-label bladder wall/tumor segmentation "
        "with DeepAtlas.\n\nPipeline: phantom | preprocess -> train-vqgan -> train-ldm -> sample -> "
        "train-deepatlas -> segment / evaluate. Exit codes: 0 success, 2 bad usage or bad input, "
        "1 internal failure."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
