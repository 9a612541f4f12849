// Dot unit and accumulator bench: the block term (four-MAC dot unit over eight words, scale
// product, shift into the 128-bit accumulator's units) and the final rounding to f32,
// against the golden model's cases (terms.hex, round.hex from `flint hdl vectors`).
`timescale 1ns/1ps
module tb_numeric;
    `include "flint_numeric.vh"
    reg [31:0] T [0:4095];
    reg [31:0] Q [0:4095];
    reg [31:0] M [0:4];
    integer i, k, n_terms, n_round, errors;
    reg signed [20:0] psum;
    reg [127:0] want, got, acc;
    reg [31:0] f;
    initial begin
        errors = 0;
        $readmemh("meta.hex", M);
        $readmemh("terms.hex", T, 0, M[2] * 22 - 1);
        $readmemh("round.hex", Q, 0, M[3] * 5 - 1);
        n_terms = 0;
        // terms.hex: weight block (9 words), activation block (9 words), term (4 words, low first).
        for (i = 0; i < M[2]; i = i + 1) begin
            psum = 0;
            for (k = 0; k < 8; k = k + 1)
                psum = psum + dot4(T[i*22 + k], T[i*22 + 9 + k]);
            got = q8_term(psum, T[i*22 + 8][15:0], T[i*22 + 17][15:0]);
            want = {T[i*22 + 21], T[i*22 + 20], T[i*22 + 19], T[i*22 + 18]};
            if (got !== want) begin
                errors = errors + 1;
                $display("FAIL: term %0d: %h, expected %h", i, got, want);
            end
            n_terms = n_terms + 1;
        end
        n_round = 0;
        // round.hex: accumulator (4 words, low first), f32.
        for (i = 0; i < M[3]; i = i + 1) begin
            acc = {Q[i*5 + 3], Q[i*5 + 2], Q[i*5 + 1], Q[i*5]};
            f = acc_to_f32(acc);
            if (f !== Q[i*5 + 4]) begin
                errors = errors + 1;
                $display("FAIL: round %0d: acc %h -> %h, expected %h", i, acc, f, Q[i*5 + 4]);
            end
            n_round = n_round + 1;
        end
        $display("numeric: %0d block terms, %0d roundings checked", n_terms, n_round);
        if (errors == 0 && n_terms > 0 && n_round > 0) $display("PASS"); else $display("FAIL: %0d errors", errors);
        $finish;
    end
endmodule
