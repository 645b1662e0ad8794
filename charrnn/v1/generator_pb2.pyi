from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP_SEQUENCE: _ClassVar[FinishReason]
    FINISH_REASON_MATCH_COMPLETE: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP_SEQUENCE: FinishReason
FINISH_REASON_MATCH_COMPLETE: FinishReason

class GenerateRequest(_message.Message):
    __slots__ = ("model", "prime", "max_chars", "temperature", "top_k", "top_p", "seed", "stop", "request_id", "logprobs", "n", "logit_bias", "allowed_chars", "regex", "presence_penalty", "frequency_penalty", "repetition_penalty", "resume_text")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRIME_FIELD_NUMBER: _ClassVar[int]
    MAX_CHARS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_CHARS_FIELD_NUMBER: _ClassVar[int]
    REGEX_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    RESUME_TEXT_FIELD_NUMBER: _ClassVar[int]
    model: str
    prime: str
    max_chars: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    logprobs: int
    n: int
    logit_bias: _containers.ScalarMap[str, float]
    allowed_chars: str
    regex: str
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    resume_text: str
    def __init__(self, model: _Optional[str] = ..., prime: _Optional[str] = ..., max_chars: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., logprobs: _Optional[int] = ..., n: _Optional[int] = ..., logit_bias: _Optional[_Mapping[str, float]] = ..., allowed_chars: _Optional[str] = ..., regex: _Optional[str] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., resume_text: _Optional[str] = ...) -> None: ...

class CharLogprob(_message.Message):
    __slots__ = ("char", "logprob", "top")
    CHAR_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    char: str
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[Alternative]
    def __init__(self, char: _Optional[str] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[Alternative, _Mapping]]] = ...) -> None: ...

class Alternative(_message.Message):
    __slots__ = ("char", "logprob")
    CHAR_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    char: str
    logprob: float
    def __init__(self, char: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "finish_reason", "stats", "index", "logprobs", "seed", "model")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: FinishReason
    stats: GenerationStats
    index: int
    logprobs: _containers.RepeatedCompositeFieldContainer[CharLogprob]
    seed: int
    model: str
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., stats: _Optional[_Union[GenerationStats, _Mapping]] = ..., index: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[CharLogprob, _Mapping]]] = ..., seed: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class GenerationStats(_message.Message):
    __slots__ = ("model", "prime_chars", "generated_chars", "queue_seconds", "prefill_seconds", "decode_seconds", "total_seconds", "stop_sequence", "seed", "resumed_chars")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRIME_CHARS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_CHARS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    RESUMED_CHARS_FIELD_NUMBER: _ClassVar[int]
    model: str
    prime_chars: int
    generated_chars: int
    queue_seconds: float
    prefill_seconds: float
    decode_seconds: float
    total_seconds: float
    stop_sequence: str
    seed: int
    resumed_chars: int
    def __init__(self, model: _Optional[str] = ..., prime_chars: _Optional[int] = ..., generated_chars: _Optional[int] = ..., queue_seconds: _Optional[float] = ..., prefill_seconds: _Optional[float] = ..., decode_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., stop_sequence: _Optional[str] = ..., seed: _Optional[int] = ..., resumed_chars: _Optional[int] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("model", "prime", "text", "top_logprobs", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRIME_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    prime: str
    text: str
    top_logprobs: int
    request_id: str
    def __init__(self, model: _Optional[str] = ..., prime: _Optional[str] = ..., text: _Optional[str] = ..., top_logprobs: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("model", "logprobs", "total_logprob", "nats_per_char", "bits_per_char")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    NATS_PER_CHAR_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_CHAR_FIELD_NUMBER: _ClassVar[int]
    model: str
    logprobs: _containers.RepeatedCompositeFieldContainer[CharLogprob]
    total_logprob: float
    nats_per_char: float
    bits_per_char: float
    def __init__(self, model: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[CharLogprob, _Mapping]]] = ..., total_logprob: _Optional[float] = ..., nats_per_char: _Optional[float] = ..., bits_per_char: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "latest", "is_default", "cell", "layers", "hidden", "vocab_size", "validation_loss", "train_steps", "corpus_sha256", "format_version", "device", "state")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LATEST_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_LOSS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    CORPUS_SHA256_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    latest: bool
    is_default: bool
    cell: str
    layers: int
    hidden: int
    vocab_size: int
    validation_loss: float
    train_steps: int
    corpus_sha256: str
    format_version: int
    device: str
    state: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., latest: _Optional[bool] = ..., is_default: _Optional[bool] = ..., cell: _Optional[str] = ..., layers: _Optional[int] = ..., hidden: _Optional[int] = ..., vocab_size: _Optional[int] = ..., validation_loss: _Optional[float] = ..., train_steps: _Optional[int] = ..., corpus_sha256: _Optional[str] = ..., format_version: _Optional[int] = ..., device: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...
