;; A counter: `increment` adds one to the u64 under the key "count" and returns the new value
;; (8 bytes, little-endian); `get` returns it; `spin` loops until it runs out of fuel.
(module
  (import "env" "storage_read" (func $storage_read (param i32 i32 i32 i32) (result i32)))
  (import "env" "storage_write" (func $storage_write (param i32 i32 i32 i32)))
  (import "env" "set_result" (func $set_result (param i32 i32)))
  (import "env" "emit" (func $emit (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "count")          ;; the key, 5 bytes at 0
  (data (i32.const 32) "incremented")   ;; the event, 11 bytes at 32
  ;; the value lives at 16 (8 bytes)

  (func $load (result i64)
    (if (i32.lt_s (call $storage_read (i32.const 0) (i32.const 5) (i32.const 16) (i32.const 8))
                  (i32.const 0))
      (then (i64.store (i32.const 16) (i64.const 0))))
    (i64.load (i32.const 16)))

  (func (export "increment") (result i32)
    (i64.store (i32.const 16) (i64.add (call $load) (i64.const 1)))
    (call $storage_write (i32.const 0) (i32.const 5) (i32.const 16) (i32.const 8))
    (call $emit (i32.const 32) (i32.const 11))
    (call $set_result (i32.const 16) (i32.const 8))
    (i32.const 0))

  (func (export "get") (result i32)
    (drop (call $load))
    (call $set_result (i32.const 16) (i32.const 8))
    (i32.const 0))

  (func (export "spin") (result i32)
    (loop $forever (br $forever))
    (i32.const 0)))
