"""What a WebAssembly module may keep between two calls, read from its binary.

The VM runs each call on a fresh instance unless the module can keep nothing from one call to
the next but its linear memory, which the VM puts back to its state just after instantiation
before every call (``kmnode.contracts.vm``). That holds for a module with:

* no mutable global (an immutable one is the same on every call);
* no table and no element segment (``table.set``/``table.copy`` would otherwise carry state);
* no passive data segment (``data.drop`` by one call would change what ``memory.init`` does in
  the next; active segments are applied at instantiation, which the snapshot holds);
* one memory of its own (imported memories are refused at deploy anyway).

Anything else, and anything this reader does not understand, is "not resettable": the VM then
takes the slow, always-correct path (a fresh instance per call). The reader is strict and
bounded: it never reads past the binary and gives up on any malformation.
"""

from __future__ import annotations

WASM_HEADER = b"\0asm\x01\0\0\0"
_TABLE, _MEMORY, _GLOBAL, _ELEMENT, _DATA, _IMPORT = 4, 5, 6, 9, 11, 2
#: Opcodes of a constant expression and the immediates they take.
_LEB_IMMEDIATE = {0x41, 0x42, 0x23, 0xD2}  # i32.const, i64.const, global.get, ref.func
_FIXED_IMMEDIATE = {0x43: 4, 0x44: 8, 0xD0: 1}  # f32.const, f64.const, ref.null
_PLAIN = {0x6A, 0x6B, 0x6C, 0x7C, 0x7D, 0x7E}  # extended-const arithmetic


class _Malformed(Exception):
    pass


class _Reader:
    def __init__(self, data: bytes, start: int = 0, end: int | None = None) -> None:
        self.data, self.at, self.end = data, start, len(data) if end is None else end

    def byte(self) -> int:
        if self.at >= self.end:
            raise _Malformed
        value = self.data[self.at]
        self.at += 1
        return value

    def leb(self) -> int:
        result = shift = 0
        for _ in range(10):
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
        raise _Malformed

    def skip(self, count: int) -> None:
        if count < 0 or self.at + count > self.end:
            raise _Malformed
        self.at += count

    def const_expr(self) -> None:
        for _ in range(1024):
            op = self.byte()
            if op == 0x0B:
                return
            if op in _LEB_IMMEDIATE:
                self.leb()
            elif op in _FIXED_IMMEDIATE:
                self.skip(_FIXED_IMMEDIATE[op])
            elif op not in _PLAIN:
                raise _Malformed
        raise _Malformed


def resettable(binary: bytes) -> bool:
    """Whether a call on this module can leave nothing behind but its memory (see above)."""
    if not binary.startswith(WASM_HEADER):
        return False
    try:
        return _resettable(binary)
    except _Malformed:
        return False


def _resettable(binary: bytes) -> bool:
    reader = _Reader(binary, len(WASM_HEADER))
    memories = 0
    while reader.at < reader.end:
        section, size = reader.byte(), reader.leb()
        body = _Reader(binary, reader.at, reader.at + size)
        reader.skip(size)
        if section in (_TABLE, _ELEMENT):
            return False
        if section == _IMPORT:
            for _ in range(body.leb()):
                for _ in range(2):  # module and field names
                    body.skip(body.leb())
                if body.byte() != 0:  # anything but a function import
                    return False
                body.leb()
        elif section == _MEMORY:
            memories += body.leb()
        elif section == _GLOBAL:
            for _ in range(body.leb()):
                body.byte()  # value type
                if body.byte() != 0:  # mutable
                    return False
                body.const_expr()
        elif section == _DATA:
            for _ in range(body.leb()):
                flags = body.leb()
                if flags == 1:  # passive
                    return False
                if flags == 2:
                    body.leb()  # memory index
                elif flags != 0:
                    return False
                body.const_expr()
                body.skip(body.leb())
    return memories == 1
