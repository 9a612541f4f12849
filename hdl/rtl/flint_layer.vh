// The decoder layer's operations between the GEMVs (docs/hdl.md, "The decoder layer"), as
// combinational functions on the contract's f32 arithmetic (flint_fp.vh) and the GEMV's
// exact terms (flint_numeric.vh): the Q8_0 quantizer, RMSNorm's parts, RoPE's rotation,
// SwiGLU, and attention's scores, weights and exact sums. Include after those two.

localparam [31:0] FP_ONE = 32'h3f800000;
localparam [31:0] FP_127 = 32'h42fe0000;
localparam [31:0] FP_LOG2E = 32'h3fb8aa3b;
localparam [31:0] FP_2P24 = 32'h4b800000;

function [31:0] fp_neg;
    input [31:0] x;
    fp_neg = {~x[31], x[30:0]};
endfunction

// f32 to f16, to nearest even (subnormals out; overflow to infinity; x finite).
function [15:0] fp_to_f16;
    input [31:0] x;
    integer e16, sh;
    reg [23:0] m, rest, half;
    reg [11:0] r;
    reg [4:0] eo;
    begin
        m = fp_sig(x);
        e16 = fp_exp(x) - 112; // f16's biased exponent for x's binade
        // Quantum: 2^13 f32 units for f16 normals, 2^-24 (sh = 126 - e) for subnormals.
        sh = (e16 >= 1) ? 13 : 14 - e16;
        if (x[30:0] == 0 || sh > 24) begin
            r = 0; // zero, or below half of f16's smallest subnormal
        end else begin
            r = m >> sh;
            rest = m & ((25'd1 << sh) - 1);
            half = 24'd1 << (sh - 1);
            r = r + ((rest > half) || (rest == half && r[0]));
        end
        if (e16 >= 1) begin
            // r in [1024, 2048]: 2048 carries into the next binade.
            if (r[11]) begin
                eo = e16 + 1;
                fp_to_f16 = (e16 + 1 >= 31) ? {x[31], 15'h7c00} : {x[31], eo, 10'd0};
            end else begin
                eo = e16;
                fp_to_f16 = (e16 >= 31) ? {x[31], 15'h7c00} : {x[31], eo, r[9:0]};
            end
        end else begin
            // Subnormal; r = 1024 is the smallest normal (exponent field 1).
            fp_to_f16 = {x[31], 4'd0, r[10], r[9:0]};
        end
    end
endfunction

// f16 to f32 (exact).
function [31:0] fp_from_f16;
    input [15:0] h;
    reg [10:0] m;
    integer e;
    begin
        m = (h[14:10] == 0) ? {1'b0, h[9:0]} : {1'b1, h[9:0]};
        e = (h[14:10] == 0) ? 1 : h[14:10];
        fp_from_f16 = fp_pack(h[15], m, e - 25);
    end
endfunction

// x rounded half away from zero to an int8 (|x| < 127.5 here).
function [7:0] fp_round_i8;
    input [31:0] x;
    integer sh;
    reg [63:0] m, n;
    begin
        m = {40'd0, fp_sig(x)};
        sh = 150 - fp_exp(x);
        if (sh > 40) n = 0;
        else if (sh <= 0) n = m << (-sh);
        else n = (m + (64'd1 << (sh - 1))) >> sh;
        fp_round_i8 = x[31] ? -n[7:0] : n[7:0];
    end
endfunction

// GGUF's reference Q8_0 quantizer over 32 f32 values (x[32*i +: 32] is value i): amax, d =
// amax / 127, id = 1 / d (0 for d = 0), q = round_half_away(x * id); 9 words out (the
// mesh's block format).
function [287:0] q8_block;
    input [1023:0] x;
    reg [30:0] amax;
    reg [31:0] d, id;
    integer i;
    reg [287:0] w;
    begin
        amax = 0;
        for (i = 0; i < 32; i = i + 1)
            if (x[32*i +: 31] > amax) amax = x[32*i +: 31];
        d = fp_div({1'b0, amax}, FP_127);
        id = (d == 0) ? 32'd0 : fp_div(FP_ONE, d);
        w = 0;
        for (i = 0; i < 32; i = i + 1)
            w[8*i +: 8] = fp_round_i8(fp_mul(x[32*i +: 32], id));
        w[256 +: 16] = fp_to_f16(d);
        q8_block = w;
    end
endfunction

// What a Q8_0 block leaves out of x: x_i - d * q_i (the next term's input).
function [1023:0] q8_residual;
    input [1023:0] x;
    input [287:0] blk;
    reg [31:0] d;
    reg [7:0] qa;
    integer i;
    reg [1023:0] r;
    begin
        d = fp_from_f16(blk[256 +: 16]);
        for (i = 0; i < 32; i = i + 1) begin
            qa = blk[8*i + 7] ? -blk[8*i +: 8] : blk[8*i +: 8]; // |q|, 8 bits (128 for -128)
            r[32*i +: 32] = fp_add(x[32*i +: 32], fp_neg(fp_mul(d, fp_pack(blk[8*i + 7], {56'd0, qa}, 0))));
        end
        q8_residual = r;
    end
endfunction

// x^2 in units of 2^-48, rounded to nearest even (|x| < 2^32).
function [127:0] sq_units;
    input [31:0] x;
    reg [127:0] s, rest, half;
    integer sh;
    begin
        s = fp_sig(x) * fp_sig(x);
        sh = 2 * fp_exp(x) - 252;
        if (sh >= 0) sq_units = s << sh;
        else if (sh < -100) sq_units = 0;
        else begin
            rest = s & ((128'd1 << (-sh)) - 1);
            half = 128'd1 << (-sh - 1);
            s = s >> (-sh);
            sq_units = s + ((rest > half) || (rest == half && s[0]));
        end
    end
endfunction

// RMSNorm's scale from the exact sum of squares of n values: 1 / sqrt(round(S) * (1/n) + eps).
function [31:0] norm_scale;
    input [127:0] s;
    input [31:0] n;
    input [31:0] eps;
    begin
        norm_scale = fp_div(FP_ONE, fp_sqrt(fp_add(fp_mul(acc_to_f32(s), fp_div(FP_ONE, fp_pack(1'b0, n, 0))), eps)));
    end
endfunction

// RoPE's rotation of the pair (a, b) by (c, s): {a*c - b*s, a*s + b*c} (high word first).
function [63:0] rope_pair;
    input [31:0] a, b, c, s;
    rope_pair = {fp_add(fp_mul(a, c), fp_neg(fp_mul(b, s))), fp_add(fp_mul(a, s), fp_mul(b, c))};
endfunction

// SwiGLU: (g * sigmoid(g)) * u, sigmoid(g) = 1 / (1 + 2^(-g * log2 e)).
function [31:0] swiglu1;
    input [31:0] g, u;
    swiglu1 = fp_mul(fp_mul(g, fp_div(FP_ONE, fp_add(FP_ONE, fp_exp2(fp_mul(fp_neg(g), FP_LOG2E))))), u);
endfunction

// A softmax weight: round_ties_even(2^(t - m) * 2^24).
function [24:0] softmax_p;
    input [31:0] t, m;
    softmax_p = fp_round_int(fp_mul(fp_exp2(fp_add(t, fp_neg(m))), FP_2P24));
endfunction

// P times one int8 value of a V block with f16 scale d, in units of 2^-48: +-(P q m) << (E - 1).
function [127:0] pv_term;
    input [24:0] p;
    input [7:0] q;
    input [15:0] d;
    reg [10:0] m;
    reg [5:0] e;
    reg [7:0] qa;
    reg [127:0] t;
    begin
        m = (d[14:10] == 0) ? {1'b0, d[9:0]} : {1'b1, d[9:0]};
        e = (d[14:10] == 0) ? 6'd1 : {1'b0, d[14:10]};
        qa = q[7] ? -q : q;
        t = ({103'd0, p} * qa * m) << (e - 6'd1);
        pv_term = (q[7] ^ d[15]) ? -t : t;
    end
endfunction
