"""The configuration: the frozen dataclasses (`model`) and the TOML loader that builds them (`load`)."""
from edgeproxy.config.load import ConfigError, load_config, parse_config, quick_config
from edgeproxy.config.model import (
    BackendConfig,
    CacheConfig,
    CertConfig,
    Config,
    LimitsConfig,
    ListenConfig,
    ListenTLSConfig,
    LogConfig,
    PoolConfig,
    PoolTLSConfig,
    RouteConfig,
    ServerConfig,
    TimeoutConfig,
)

__all__ = [
    "ConfigError", "load_config", "parse_config", "quick_config",
    "Config", "ServerConfig", "ListenConfig", "ListenTLSConfig", "CertConfig",
    "RouteConfig", "PoolConfig", "PoolTLSConfig", "BackendConfig",
    "TimeoutConfig", "LimitsConfig", "LogConfig", "CacheConfig",
]
