// Floating-point bench: the layer contract's f32 multiply, add and 2^x (rtl/flint_fp.vh)
// against the golden model's cases (fp.hex from `flint hdl vectors`: the case count, then
// op, a, b, expected per case; op 0 = a * b, 1 = a + b, 2 = 2^a, 3 = a / b, 4 = sqrt(a)).
`timescale 1ns/1ps
module tb_fp;
    `include "flint_fp.vh"
    reg [31:0] V [0:131071];
    integer i, n, errors, op;
    integer count [0:4];
    reg [31:0] N [0:0];
    reg [31:0] a, b, want, got;
    initial begin
        errors = 0;
        for (i = 0; i < 5; i = i + 1) count[i] = 0;
        $readmemh("fp_meta.hex", N);
        n = N[0];
        $readmemh("fp.hex", V, 0, 4*n - 1);
        for (i = 0; i < n; i = i + 1) begin
            op = V[4*i];
            a = V[4*i + 1];
            b = V[4*i + 2];
            want = V[4*i + 3];
            got = (op == 0) ? fp_mul(a, b) : (op == 1) ? fp_add(a, b) : (op == 2) ? fp_exp2(a) : (op == 3) ? fp_div(a, b) : fp_sqrt(a);
            if (got !== want) begin
                errors = errors + 1;
                if (errors <= 20) $display("FAIL: case %0d op %0d: %h, %h -> %h, expected %h", i, op, a, b, got, want);
            end
            count[op] = count[op] + 1;
        end
        $display("fp: %0d products, %0d sums, %0d powers of two, %0d quotients, %0d square roots checked", count[0], count[1], count[2], count[3], count[4]);
        if (errors == 0 && count[0] > 0 && count[1] > 0 && count[2] > 0 && count[3] > 0 && count[4] > 0) $display("PASS"); else $display("FAIL: %0d errors", errors);
        $finish;
    end
endmodule
