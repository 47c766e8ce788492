from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("table", "ids", "trainer_id", "step")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    trainer_id: int
    step: int
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., trainer_id: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: Tensor
    def __init__(self, rows: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("table", "ids", "grads", "trainer_id", "step")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    grads: Tensor
    trainer_id: int
    step: int
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., grads: _Optional[_Union[Tensor, _Mapping]] = ..., trainer_id: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("applied_steps",)
    APPLIED_STEPS_FIELD_NUMBER: _ClassVar[int]
    applied_steps: int
    def __init__(self, applied_steps: _Optional[int] = ...) -> None: ...

class DensePullRequest(_message.Message):
    __slots__ = ("names", "trainer_id", "step")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    trainer_id: int
    step: int
    def __init__(self, names: _Optional[_Iterable[str]] = ..., trainer_id: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class DensePullResponse(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, values: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class DensePushRequest(_message.Message):
    __slots__ = ("names", "grads", "trainer_id", "step")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    grads: _containers.RepeatedCompositeFieldContainer[Tensor]
    trainer_id: int
    step: int
    def __init__(self, names: _Optional[_Iterable[str]] = ..., grads: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., trainer_id: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class DensePushResponse(_message.Message):
    __slots__ = ("applied_steps",)
    APPLIED_STEPS_FIELD_NUMBER: _ClassVar[int]
    applied_steps: int
    def __init__(self, applied_steps: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TableInfo(_message.Message):
    __slots__ = ("name", "dim", "rows", "optimizer", "applied_steps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    APPLIED_STEPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    rows: int
    optimizer: str
    applied_steps: int
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., rows: _Optional[int] = ..., optimizer: _Optional[str] = ..., applied_steps: _Optional[int] = ...) -> None: ...

class DenseInfo(_message.Message):
    __slots__ = ("name", "shape", "optimizer", "applied_steps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    APPLIED_STEPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    optimizer: str
    applied_steps: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., optimizer: _Optional[str] = ..., applied_steps: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("pserver_id", "num_pservers", "mode", "num_trainers", "virtual_shards", "tables", "dense")
    PSERVER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PSERVERS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAINERS_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_SHARDS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    pserver_id: int
    num_pservers: int
    mode: str
    num_trainers: int
    virtual_shards: int
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    dense: _containers.RepeatedCompositeFieldContainer[DenseInfo]
    def __init__(self, pserver_id: _Optional[int] = ..., num_pservers: _Optional[int] = ..., mode: _Optional[str] = ..., num_trainers: _Optional[int] = ..., virtual_shards: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ..., dense: _Optional[_Iterable[_Union[DenseInfo, _Mapping]]] = ...) -> None: ...

class TableIds(_message.Message):
    __slots__ = ("table", "ids")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ...) -> None: ...

class PullBatchRequest(_message.Message):
    __slots__ = ("tables", "dense", "trainer_id", "step")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableIds]
    dense: _containers.RepeatedScalarFieldContainer[str]
    trainer_id: int
    step: int
    def __init__(self, tables: _Optional[_Iterable[_Union[TableIds, _Mapping]]] = ..., dense: _Optional[_Iterable[str]] = ..., trainer_id: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class PullBatchResponse(_message.Message):
    __slots__ = ("rows", "dense")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[Tensor]
    dense: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, rows: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., dense: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class TableGrads(_message.Message):
    __slots__ = ("table", "ids", "grads")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    grads: Tensor
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., grads: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PushBatchRequest(_message.Message):
    __slots__ = ("tables", "dense", "dense_grads", "trainer_id", "step")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    DENSE_GRADS_FIELD_NUMBER: _ClassVar[int]
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableGrads]
    dense: _containers.RepeatedScalarFieldContainer[str]
    dense_grads: _containers.RepeatedCompositeFieldContainer[Tensor]
    trainer_id: int
    step: int
    def __init__(self, tables: _Optional[_Iterable[_Union[TableGrads, _Mapping]]] = ..., dense: _Optional[_Iterable[str]] = ..., dense_grads: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., trainer_id: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class PushBatchResponse(_message.Message):
    __slots__ = ("applied_steps",)
    APPLIED_STEPS_FIELD_NUMBER: _ClassVar[int]
    applied_steps: int
    def __init__(self, applied_steps: _Optional[int] = ...) -> None: ...

class SaveShardRequest(_message.Message):
    __slots__ = ("serial", "background", "delta", "base")
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    serial: int
    background: bool
    delta: bool
    base: int
    def __init__(self, serial: _Optional[int] = ..., background: _Optional[bool] = ..., delta: _Optional[bool] = ..., base: _Optional[int] = ...) -> None: ...

class SaveShardResponse(_message.Message):
    __slots__ = ("part", "missing_base")
    PART_FIELD_NUMBER: _ClassVar[int]
    MISSING_BASE_FIELD_NUMBER: _ClassVar[int]
    part: str
    missing_base: str
    def __init__(self, part: _Optional[str] = ..., missing_base: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("role", "id", "address", "incarnation", "generation")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    role: str
    id: int
    address: str
    incarnation: str
    generation: int
    def __init__(self, role: _Optional[str] = ..., id: _Optional[int] = ..., address: _Optional[str] = ..., incarnation: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("serial", "generation")
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    serial: int
    generation: int
    def __init__(self, serial: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class ReadyRequest(_message.Message):
    __slots__ = ("pserver_id", "serial", "generation", "damaged")
    PSERVER_ID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    DAMAGED_FIELD_NUMBER: _ClassVar[int]
    pserver_id: int
    serial: int
    generation: int
    damaged: str
    def __init__(self, pserver_id: _Optional[int] = ..., serial: _Optional[int] = ..., generation: _Optional[int] = ..., damaged: _Optional[str] = ...) -> None: ...

class ReadyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BarrierRequest(_message.Message):
    __slots__ = ("trainer_id", "global_step", "epoch_id", "step_id", "final")
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_STEP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    trainer_id: int
    global_step: int
    epoch_id: int
    step_id: int
    final: bool
    def __init__(self, trainer_id: _Optional[int] = ..., global_step: _Optional[int] = ..., epoch_id: _Optional[int] = ..., step_id: _Optional[int] = ..., final: _Optional[bool] = ...) -> None: ...

class BarrierResponse(_message.Message):
    __slots__ = ("serial",)
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    serial: int
    def __init__(self, serial: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("trainer_id", "serial", "part")
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    trainer_id: int
    serial: int
    part: str
    def __init__(self, trainer_id: _Optional[int] = ..., serial: _Optional[int] = ..., part: _Optional[str] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("serial",)
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    serial: int
    def __init__(self, serial: _Optional[int] = ...) -> None: ...

class ReportPartRequest(_message.Message):
    __slots__ = ("pserver_id", "serial", "part", "error")
    PSERVER_ID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    pserver_id: int
    serial: int
    part: str
    error: str
    def __init__(self, pserver_id: _Optional[int] = ..., serial: _Optional[int] = ..., part: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class ReportPartResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("role", "id", "incarnation", "generation", "global_step", "finished")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_STEP_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    role: str
    id: int
    incarnation: str
    generation: int
    global_step: int
    finished: bool
    def __init__(self, role: _Optional[str] = ..., id: _Optional[int] = ..., incarnation: _Optional[str] = ..., generation: _Optional[int] = ..., global_step: _Optional[int] = ..., finished: _Optional[bool] = ...) -> None: ...

class MembersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MembersResponse(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("generation", "serial", "running")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    generation: int
    serial: int
    running: bool
    def __init__(self, generation: _Optional[int] = ..., serial: _Optional[int] = ..., running: _Optional[bool] = ...) -> None: ...
