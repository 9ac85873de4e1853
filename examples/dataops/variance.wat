;; A data operation in WebAssembly (issue 15): the population variance of one column.
;;
;; The ABI the service enclave runs such an operation with (kmnode/dataauth/wasm_op.py): the
;; contract VM's host functions, no storage (an operation keeps nothing), the exported `run`
;; takes nothing and returns 0 on success. Its input (`args_copy`) is the column's values as
;; little-endian f64, in row order; its result (`set_result`) is one little-endian f64. The
;; enclave refuses a group smaller than the dataset's minimum before it runs the code, and
;; fuel bounds the work. An owner allows the operation by name; its checksum (sha256 of this
;; module as registered) is what every token for it binds.
(module
  (import "env" "args_copy" (func $args_copy (param i32 i32) (result i32)))
  (import "env" "set_result" (func $set_result (param i32 i32)))
  (memory (export "memory") 64)  ;; 4 MiB: the values start at 8, so up to 524,287 of them

  (func $at (param $i i32) (result f64)
    (f64.load (i32.add (i32.const 8) (i32.shl (local.get $i) (i32.const 3)))))

  (func (export "run") (result i32)
    (local $len i32) (local $n i32) (local $i i32)
    (local $sum f64) (local $mean f64) (local $d f64) (local $squares f64)
    (local.set $len (call $args_copy (i32.const 8) (i32.const 4194296)))
    (if (i32.gt_u (local.get $len) (i32.const 4194296)) (then (return (i32.const 1))))
    (local.set $n (i32.shr_u (local.get $len) (i32.const 3)))
    (if (i32.eqz (local.get $n)) (then (return (i32.const 2))))
    (block $summed
      (loop $sum_next
        (br_if $summed (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $sum (f64.add (local.get $sum) (call $at (local.get $i))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $sum_next)))
    (local.set $mean (f64.div (local.get $sum) (f64.convert_i32_u (local.get $n))))
    (local.set $i (i32.const 0))
    (block $squared
      (loop $square_next
        (br_if $squared (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $d (f64.sub (call $at (local.get $i)) (local.get $mean)))
        (local.set $squares (f64.add (local.get $squares) (f64.mul (local.get $d) (local.get $d))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $square_next)))
    (f64.store (i32.const 0) (f64.div (local.get $squares) (f64.convert_i32_u (local.get $n))))
    (call $set_result (i32.const 0) (i32.const 8))
    (i32.const 0)))
