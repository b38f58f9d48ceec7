"""Configuration for the command-line tools: Hydra's compose API over `conf/`, with bad input
reported as one line on stderr and exit status 2."""
import copy
import dataclasses
import functools
import sys
from pathlib import Path
from typing import Callable, List, NoReturn, Tuple

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from app import config

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_config(overrides: List[str]) -> config.Config:
    config.register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return cfg


def startup_config(argv: List[str]) -> config.Config:
    """The config of argv's overrides, for what Horovod must know when it starts, which is
    before Hydra composes the run's config (ranks first agree on the run directory over
    Horovod). Hydra's flags and hydra.* overrides are Hydra's own; if the overrides do not
    compose, this is the schema's defaults and Hydra reports the error when it composes them.
    Composed once per argv (each call gets its own copy): a rank's start asks up to three times
    (its malloc, parallel.auto, Horovod's start), and a compose is about 0.1 s of CPU."""
    overrides = [arg for arg in argv if "=" in arg and not arg.lstrip("+~").startswith(("-", "hydra.", "hydra/"))]
    return copy.deepcopy(_startup_config(tuple(overrides)))


@functools.lru_cache(maxsize=None)
def _startup_config(overrides: Tuple[str, ...]) -> config.Config:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose_config(list(overrides))
    except (HydraException, OmegaConfBaseException):
        return OmegaConf.structured(config.Config)


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run(main: Callable[[config.Config], None], validate: Callable[[config.Config], None] = config.validate) -> None:
    """Compose the Hydra config from argv, check it with `validate`, call main, and turn bad
    input into one line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose_config(sys.argv[1:])
        OmegaConf.resolve(cfg)
        validate(cfg)
    except (HydraException, OmegaConfBaseException, config.ConfigError) as error:
        fail(" ".join(str(error).split()) or repr(error))
    call_reporting_bad_input(main, cfg)


def tool_overrides(schema, argv: List[str]) -> dict:
    """`key=value` arguments as a dict. A string field takes its value as typed: the shell has
    dropped the quotes of `prompt="ROMEO:"`, and YAML would read `ROMEO:` as a mapping. Other
    fields, and unknown keys (which the schema then refuses), are parsed as YAML values."""
    text_fields = {field.name for field in dataclasses.fields(schema) if field.type is str}
    overrides = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in text_fields:
            overrides[key] = value
        else:
            overrides.update(OmegaConf.to_container(OmegaConf.from_dotlist([arg])))
    return overrides


def parse_tool_args(schema, argv: List[str]):
    """`key=value` arguments checked against a dataclass schema: a typo is an error, not ignored."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), tool_overrides(schema, argv))
        OmegaConf.to_container(cfg, throw_on_missing=True)
    except OmegaConfBaseException as error:
        fail(" ".join(str(error).split()) + f"; usage: {schema.__doc__}")
    return cfg


def run_tool(schema, main: Callable) -> None:
    call_reporting_bad_input(main, parse_tool_args(schema, sys.argv[1:]))


def call_reporting_bad_input(main: Callable, cfg) -> None:
    """Missing files and bad values become one line and exit status 2, not a traceback."""
    try:
        main(cfg)
    except (FileNotFoundError, ValueError, KeyError) as error:
        fail(str(error))
