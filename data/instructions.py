"""Instruction-tuning records read without TensorFlow: each record of a file, with its place, as a
conversation. data/sft.py builds its pipeline on them; evaluation commands (model/evaluate.py) read
held-out sets with them.

Formats (local or gs://), with configurable field names (config.data.fields):
  alpaca    {"instruction", "input" (optional), "output"}, as JSONL or one JSON array
  chat      {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]} per line
  sharegpt  chat with ShareGPT's names, the hub's most common chat layout: {"conversations": [{"from":
            "system"|"human"|"gpt", "value": ...}, ...]}, roles human -> user and gpt -> assistant
            (field names that config.data.fields sets away from the defaults win)
  prompt_completion  {"prompt", "completion"} per line
Role names other than system/user/assistant are renamed by config.data.roles, comma-separated
NAME=ROLE pairs ('human=user,gpt=assistant'), over sharegpt's own; other roles stay as they are, and
the chat template judges them (an error naming the file and line). Files named *.parquet are read as
Parquet, one row group at a time, the format's fields being columns (`messages` a list of {role,
content} structs, as `datasets` writes them); readers that keep the whole record (evaluation's `task`,
reward functions' columns) read every column, so that a record is the same in JSONL and Parquet.
Problems name the file and line (Parquet: file, row group and row).
"""

from typing import Any, Iterator, Mapping

from etils import epath

from data import records
from data.config import SFT_FORMATS, get_config
from data.files import open_parquet, one_line, resolve_files
from data.records import BadRecord

# The fields (keys of config.data.fields) that each format reads (preference pairs: data/preference.py),
# and those that may be missing.
FORMAT_FIELDS = {'alpaca': ('instruction', 'input', 'output'), 'chat': ('messages',),
                 'sharegpt': ('messages',), 'prompt_completion': ('prompt', 'completion'),
                 'preference': ('prompt', 'chosen', 'rejected')}
OPTIONAL_FIELDS = {'alpaca': ('input',), 'preference': ('prompt',)}
# ShareGPT's names for the chat format's fields and roles.
SHAREGPT_FIELDS = {'messages': 'conversations', 'role': 'from', 'content': 'value'}
SHAREGPT_ROLES = {'human': 'user', 'gpt': 'assistant'}
_DEFAULT_FIELDS = dict(get_config().fields)


def format_fields(fmt: str, fields: Any) -> Mapping[str, str]:
  """The field names that format `fmt` reads: config.data.fields, with sharegpt's own names for the
  fields that config.data.fields leaves at their defaults."""
  if fmt != 'sharegpt':
    return fields
  return {**{k: fields[k] for k in _DEFAULT_FIELDS},
          **{k: v for k, v in SHAREGPT_FIELDS.items() if fields[k] == _DEFAULT_FIELDS[k]}}


def role_map(cfg: Any) -> dict[str, str]:
  """The role renames of a data config: sharegpt's (for that format), then config.data.roles."""
  roles = dict(SHAREGPT_ROLES) if cfg.format == 'sharegpt' else {}
  text = cfg.get('roles') or ''
  for pair in filter(None, (p.strip() for p in text.split(','))):
    name, _, role = (part.strip() for part in pair.partition('='))
    if not (name and role):
      raise ValueError(f'config.data.roles must be comma-separated NAME=ROLE pairs, such as '
                       f'"human=user,gpt=assistant"; got {text!r} (the pair {pair!r})')
    roles[name] = role
  return roles


def _parquet_records(path: str, fmt: str, fields: Any, every_column: bool = False
                     ) -> Iterator[tuple[str, Any]]:
  """(location, row as a dict, or the BadRecord it is) for each row of a Parquet file: the format's
  columns, or with `every_column` all of them."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  fields = format_fields(fmt, fields)
  with open_parquet(path) as parquet:
    names = parquet.schema_arrow.names
    missing = [f for f in FORMAT_FIELDS[fmt]
               if fields[f] not in names and f not in OPTIONAL_FIELDS.get(fmt, ())]
    if missing:
      raise BadRecord(f'{path}: no column {fields[missing[0]]!r} (config.data.fields.{missing[0]}); '
                      f'columns: {names}')
    columns = None if every_column else [fields[f] for f in FORMAT_FIELDS[fmt] if fields[f] in names]
    for group in range(parquet.metadata.num_row_groups):
      where = f'{path}, row group {group}'
      try:
        rows = parquet.read_row_group(group, columns=columns).to_pylist()
      except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        yield where, BadRecord(f'{where}: cannot be read ({one_line(e)})')
        continue
      for i, row in enumerate(rows):
        yield f'{where}, row {i}', row


def read_records(path: str, cfg: Any, counters: records.Counters, every_column: bool = False
                 ) -> Iterator[tuple[str, Any]]:
  """(location, parsed record or the BadRecord it is) for each record of a .json array, JSONL or
  .parquet file. A Parquet record holds the columns of its format, or with `every_column` all of
  them, as a JSON record holds all its fields."""
  if path.endswith('.parquet'):
    yield from _parquet_records(path, cfg.format, cfg.fields, every_column)
    return
  utf8, max_record_bytes = cfg.invalid_utf8, cfg.max_record_bytes
  with epath.Path(path).open('rb') as f:
    if path.endswith('.json') and f.read(4096).lstrip().startswith(b'['):
      f.seek(0)
      try:
        items = records.parse_json(records.decode(f.read(), path, 0, utf8=utf8, counters=counters), path)
      except records.BadRecord as e:
        yield path, e
        return
      for i, item in enumerate(items):
        yield f'{path}[record {i}]', item
      return
    f.seek(0)
    for where, raw, offset in records.lines(f, path):
      try:
        text = records.decode(raw, where, offset, utf8=utf8, max_record_bytes=max_record_bytes,
                              counters=counters)
        if text.strip():
          yield where, records.parse_json(text, where)
      except records.BadRecord as e:
        yield where, e


def to_messages(record: Any, fmt: str, fields: Any, roles: Mapping[str, str] | None = None
                ) -> list[dict[str, str]]:
  """One record of format `fmt` -> a conversation (list of {role, content}), its roles renamed by
  `roles` (role_map)."""
  fields = format_fields(fmt, fields)
  if not isinstance(record, dict):
    raise BadRecord(f'expected a JSON object, got {type(record).__name__}')

  def field(name, required=True):
    key = fields[name]
    if key not in record:
      if required:
        raise BadRecord(f'missing field {key!r} (config.data.fields.{name}); '
                           f'record has {sorted(record)}')
      return ''
    if not isinstance(record[key], (str, list)):
      raise BadRecord(f'field {key!r} must be a string, got {type(record[key]).__name__}')
    return record[key]

  if fmt == 'alpaca':
    instruction, extra = field('instruction'), field('input', required=False)
    user = f'{instruction}\n\n{extra}' if isinstance(extra, str) and extra.strip() else instruction
    return [{'role': 'user', 'content': user}, {'role': 'assistant', 'content': field('output')}]
  if fmt == 'prompt_completion':
    return [{'role': 'user', 'content': field('prompt')},
            {'role': 'assistant', 'content': field('completion')}]
  if fmt in ('chat', 'sharegpt'):
    messages = field('messages')
    if not isinstance(messages, list):
      raise BadRecord(f'field {fields["messages"]!r} must be a list of messages')
    return message_list(messages, fields, roles=roles)
  raise ValueError(f'config.data.format must be one of {SFT_FORMATS}, got {fmt!r}')


def message_list(messages: list, fields: Any, prefix: str = '', roles: Mapping[str, str] | None = None
                 ) -> list[dict[str, str]]:
  """`messages`, objects with the role and content fields that `fields` names, as {'role', 'content'}
  dicts, each role renamed by `roles` where it names it; a malformed one is a BadRecord (its message
  after `prefix`)."""
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or fields['role'] not in m or fields['content'] not in m:
      raise BadRecord(f'{prefix}message {i} must be an object with {fields["role"]!r} and '
                      f'{fields["content"]!r}')
    role = m[fields['role']]
    if roles and isinstance(role, str):
      role = roles.get(role, role)
    out.append({'role': role, 'content': m[fields['content']]})
  return out


def conversations(patterns: str, cfg: Any, limit: int = 0) -> list[tuple[str, list[dict[str, str]], Any]]:
  """(where, messages, the record itself) for every record of the files `patterns` names, in format
  `cfg.format` (`cfg`: a data config, e.g. data.config.get_config()); the first `limit` (0: all). A bad
  record is a BadRecord naming its place."""
  out = []
  counters = records.Counters()
  roles = role_map(cfg)
  for path in resolve_files(patterns):
    for where, record in read_records(path, cfg, counters, every_column=True):
      if isinstance(record, BadRecord):
        raise record
      try:
        out.append((where, to_messages(record, cfg.format, cfg.fields, roles), record))
      except BadRecord as e:
        raise BadRecord(f'{where}: {e}') from None
      if len(out) == limit:
        return out
  return out
