"""Configuration for the command-line tools: Hydra's compose API over `conf/`, with bad input
reported as one line on stderr and exit status 2."""
import sys
from pathlib import Path
from typing import Callable, List, Optional

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from app import config

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_config(overrides: List[str]) -> config.Config:
    config.register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return cfg


def fail(message: str) -> "NoReturn":  # noqa: F821
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def split_args(argv: List[str], own_keys: List[str]):
    """Split `key=value` arguments into this tool's own options and Hydra overrides."""
    own, overrides = {}, []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in own_keys:
            own[key] = value
        else:
            overrides.append(arg)
    return own, overrides


def run(main: Callable[[config.Config, dict], None], own_keys: Optional[List[str]] = None) -> None:
    """Parse argv into (config, own options), call main, and turn bad input into one line."""
    from omegaconf.errors import OmegaConfBaseException
    from hydra.errors import HydraException

    own, overrides = split_args(sys.argv[1:], own_keys or [])
    try:
        cfg = compose_config(overrides)
        OmegaConf.resolve(cfg)
        config.validate(cfg)
    except (HydraException, OmegaConfBaseException, config.ConfigError) as error:
        fail(" ".join(str(error).split()) or repr(error))
    try:
        main(cfg, own)
    except (FileNotFoundError, ValueError, KeyError) as error:
        fail(str(error))
