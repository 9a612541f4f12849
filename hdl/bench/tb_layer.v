// The decoder layer's units, one after another, against one layer's vectors from
// `flint hdl layer` (docs/hdl.md, "Layer vectors"): both RMSNorms with the Q8_0 quantizer
// (x_in -> attn_in, x_mid -> ffn_in), RoPE (q, k -> q_rope, k_rope; v -> v_q8), attention
// over the cache (q_rope, k_cache, v_cache -> attn), SwiGLU (gate, up -> h) and both residual
// adds. Every word must match.
`timescale 1ns/1ps
module tb_layer;
    `include "flint_numeric.vh"
    `include "flint_fp.vh"
    `include "flint_layer.vh"
    localparam MAXV = 4096, MAXC = 1 << 18;
    reg [31:0] META [0:10];
    reg [31:0] X_IN [0:MAXV-1], X_MID [0:MAXV-1], X_OUT [0:MAXV-1], O [0:MAXV-1], DOWN [0:MAXV-1];
    reg [31:0] AN [0:MAXV-1], FN [0:MAXV-1], Q [0:MAXV-1], K [0:MAXV-1], V [0:MAXV-1], ROPE [0:MAXV-1];
    reg [31:0] ATTN [0:MAXV-1], GATE [0:MAXV-1], UP [0:MAXV-1];
    reg [31:0] ATTN_IN [0:MAXV*9], FFN_IN [0:MAXV*9], Q_ROPE [0:MAXV*9], K_ROPE [0:MAXV*9], V_Q8 [0:MAXV*9], H [0:MAXV*9];
    reg [31:0] KC [0:MAXC-1], VC [0:MAXC-1];
    reg [31:0] Y [0:MAXV-1];
    reg [31:0] T [0:65535];
    reg [24:0] P [0:65535];
    reg [31:0] got [0:MAXV*9];
    integer n_embd, n_head, n_kv, hd, n_ff, pairs, pos, terms, len, errors, checks;
    integer i, j, b, t, h, g, kt, qt, hb, kvb, row, nb;
    reg [31:0] eps, cscale, m, inv;
    reg [127:0] acc, s;
    reg [127:0] A [0:255];
    reg [1023:0] xb;
    reg [287:0] blk;
    reg [63:0] pr;

    // Quantize Y[0..n) into `terms` Q8_0 terms: got[] holds terms x n/32 blocks of 9 words.
    task quantize;
        input integer n;
        integer tt, bb, ii;
        begin
            for (tt = 0; tt < terms; tt = tt + 1)
                for (bb = 0; bb < n / 32; bb = bb + 1) begin
                    for (ii = 0; ii < 32; ii = ii + 1) xb[32*ii +: 32] = Y[32*bb + ii];
                    blk = q8_block(xb);
                    for (ii = 0; ii < 9; ii = ii + 1) got[(tt * (n / 32) + bb) * 9 + ii] = blk[32*ii +: 32];
                    xb = q8_residual(xb, blk);
                    for (ii = 0; ii < 32; ii = ii + 1) Y[32*bb + ii] = xb[32*ii +: 32];
                end
        end
    endtask

    task check;
        input [31:0] a, w;
        input [8*12:1] what;
        input integer idx;
        begin
            checks = checks + 1;
            if (a !== w) begin
                errors = errors + 1;
                if (errors <= 20) $display("FAIL: %0s word %0d: %h, expected %h", what, idx, a, w);
            end
        end
    endtask

    task rmsnorm_check;
        input integer which; // 0: x_in -> attn_in, 1: x_mid -> ffn_in
        begin
            s = 0;
            for (i = 0; i < n_embd; i = i + 1) s = s + sq_units(which ? X_MID[i] : X_IN[i]);
            inv = norm_scale(s, n_embd, eps);
            for (i = 0; i < n_embd; i = i + 1) Y[i] = fp_mul(fp_mul(which ? X_MID[i] : X_IN[i], inv), which ? FN[i] : AN[i]);
            quantize(n_embd);
            for (i = 0; i < terms * n_embd / 32 * 9; i = i + 1) check(got[i], which ? FFN_IN[i] : ATTN_IN[i], which ? "ffn_in" : "attn_in", i);
        end
    endtask

    initial begin
        errors = 0; checks = 0;
        $readmemh("meta.hex", META);
        n_embd = META[0]; n_head = META[1]; n_kv = META[2]; hd = META[3]; n_ff = META[4];
        pairs = META[5]; pos = META[7]; terms = META[8]; eps = META[9]; cscale = META[10];
        len = pos + 1; hb = hd / 32; kvb = n_kv * hb; row = terms * kvb;
        $readmemh("x_in.hex", X_IN, 0, n_embd - 1);
        $readmemh("x_mid.hex", X_MID, 0, n_embd - 1);
        $readmemh("x_out.hex", X_OUT, 0, n_embd - 1);
        $readmemh("o.hex", O, 0, n_embd - 1);
        $readmemh("down.hex", DOWN, 0, n_embd - 1);
        $readmemh("attn_norm.hex", AN, 0, n_embd - 1);
        $readmemh("ffn_norm.hex", FN, 0, n_embd - 1);
        $readmemh("q.hex", Q, 0, n_head * hd - 1);
        $readmemh("k.hex", K, 0, kvb * 32 - 1);
        $readmemh("v.hex", V, 0, kvb * 32 - 1);
        $readmemh("rope.hex", ROPE, 0, 2 * pairs - 1);
        $readmemh("attn.hex", ATTN, 0, n_head * hd - 1);
        $readmemh("gate.hex", GATE, 0, n_ff - 1);
        $readmemh("up.hex", UP, 0, n_ff - 1);
        $readmemh("attn_in.hex", ATTN_IN, 0, terms * n_embd / 32 * 9 - 1);
        $readmemh("ffn_in.hex", FFN_IN, 0, terms * n_embd / 32 * 9 - 1);
        $readmemh("q_rope.hex", Q_ROPE, 0, terms * n_head * hb * 9 - 1);
        $readmemh("k_rope.hex", K_ROPE, 0, terms * kvb * 9 - 1);
        $readmemh("v_q8.hex", V_Q8, 0, terms * kvb * 9 - 1);
        $readmemh("h.hex", H, 0, terms * n_ff / 32 * 9 - 1);
        $readmemh("k_cache.hex", KC, 0, len * row * 9 - 1);
        $readmemh("v_cache.hex", VC, 0, len * row * 9 - 1);

        // RMSNorm and the quantizer, before attention and before the FFN.
        rmsnorm_check(0);
        rmsnorm_check(1);

        // RoPE on every head of q and k (adjacent pairs), then the quantizer; v as it is.
        for (i = 0; i < n_head * hd; i = i + 1) Y[i] = Q[i];
        for (h = 0; h < n_head; h = h + 1)
            for (j = 0; j < pairs; j = j + 1) begin
                pr = rope_pair(Q[h*hd + 2*j], Q[h*hd + 2*j + 1], ROPE[2*j], ROPE[2*j + 1]);
                Y[h*hd + 2*j] = pr[63:32]; Y[h*hd + 2*j + 1] = pr[31:0];
            end
        quantize(n_head * hd);
        for (i = 0; i < terms * n_head * hb * 9; i = i + 1) check(got[i], Q_ROPE[i], "q_rope", i);
        for (i = 0; i < kvb * 32; i = i + 1) Y[i] = K[i];
        for (h = 0; h < n_kv; h = h + 1)
            for (j = 0; j < pairs; j = j + 1) begin
                pr = rope_pair(K[h*hd + 2*j], K[h*hd + 2*j + 1], ROPE[2*j], ROPE[2*j + 1]);
                Y[h*hd + 2*j] = pr[63:32]; Y[h*hd + 2*j + 1] = pr[31:0];
            end
        quantize(kvb * 32);
        for (i = 0; i < terms * kvb * 9; i = i + 1) check(got[i], K_ROPE[i], "k_rope", i);
        // The cache's last position is this token's K.
        for (i = 0; i < terms * kvb * 9; i = i + 1) check(KC[pos * row * 9 + i], K_ROPE[i], "k_cache", i);
        for (i = 0; i < kvb * 32; i = i + 1) Y[i] = V[i];
        quantize(kvb * 32);
        for (i = 0; i < terms * kvb * 9; i = i + 1) check(got[i], V_Q8[i], "v_q8", i);

        // Attention: per head, exact scores, the max, the weights, exact sums, one division.
        for (h = 0; h < n_head; h = h + 1) begin
            g = h / (n_head / n_kv);
            m = 32'hff800000; // -infinity
            for (j = 0; j < len; j = j + 1) begin
                acc = 0;
                for (qt = 0; qt < terms; qt = qt + 1)
                    for (kt = 0; kt < terms; kt = kt + 1)
                        for (b = 0; b < hb; b = b + 1)
                            acc = acc + q8_term(
                                dot4(KC[((j*row + kt*kvb + g*hb + b) * 9) + 0], Q_ROPE[((qt*n_head*hb + h*hb + b) * 9) + 0])
                              + dot4(KC[((j*row + kt*kvb + g*hb + b) * 9) + 1], Q_ROPE[((qt*n_head*hb + h*hb + b) * 9) + 1])
                              + dot4(KC[((j*row + kt*kvb + g*hb + b) * 9) + 2], Q_ROPE[((qt*n_head*hb + h*hb + b) * 9) + 2])
                              + dot4(KC[((j*row + kt*kvb + g*hb + b) * 9) + 3], Q_ROPE[((qt*n_head*hb + h*hb + b) * 9) + 3])
                              + dot4(KC[((j*row + kt*kvb + g*hb + b) * 9) + 4], Q_ROPE[((qt*n_head*hb + h*hb + b) * 9) + 4])
                              + dot4(KC[((j*row + kt*kvb + g*hb + b) * 9) + 5], Q_ROPE[((qt*n_head*hb + h*hb + b) * 9) + 5])
                              + dot4(KC[((j*row + kt*kvb + g*hb + b) * 9) + 6], Q_ROPE[((qt*n_head*hb + h*hb + b) * 9) + 6])
                              + dot4(KC[((j*row + kt*kvb + g*hb + b) * 9) + 7], Q_ROPE[((qt*n_head*hb + h*hb + b) * 9) + 7]),
                                KC[((j*row + kt*kvb + g*hb + b) * 9) + 8][15:0], Q_ROPE[((qt*n_head*hb + h*hb + b) * 9) + 8][15:0]);
                T[j] = fp_mul(acc_to_f32(acc), cscale);
                // The max of f32 values (no NaNs): by magnitude bits and sign.
                if (m == 32'hff800000 || (T[j][31] == 0 && (m[31] == 1 || T[j][30:0] > m[30:0])) || (T[j][31] == 1 && m[31] == 1 && T[j][30:0] < m[30:0]))
                    m = T[j];
            end
            s = 0;
            for (i = 0; i < hd; i = i + 1) A[i] = 0;
            for (j = 0; j < len; j = j + 1) begin
                P[j] = softmax_p(T[j], m);
                s = s + P[j];
                for (t = 0; t < terms; t = t + 1)
                    for (b = 0; b < hb; b = b + 1)
                        for (i = 0; i < 32; i = i + 1)
                            A[b*32 + i] = A[b*32 + i] + pv_term(P[j], VC[((j*row + t*kvb + g*hb + b) * 9) + i/4][8*(i%4) +: 8], VC[((j*row + t*kvb + g*hb + b) * 9) + 8][15:0]);
            end
            inv = fp_div(FP_ONE, acc_to_f32(s << 24));
            for (i = 0; i < hd; i = i + 1) check(fp_mul(acc_to_f32(A[i]), inv), ATTN[h*hd + i], "attn", h*hd + i);
        end

        // SwiGLU, then the quantizer.
        for (i = 0; i < n_ff; i = i + 1) Y[i] = swiglu1(GATE[i], UP[i]);
        quantize(n_ff);
        for (i = 0; i < terms * n_ff / 32 * 9; i = i + 1) check(got[i], H[i], "h", i);

        // The residual adds.
        for (i = 0; i < n_embd; i = i + 1) begin
            check(fp_add(X_IN[i], O[i]), X_MID[i], "x_mid", i);
            check(fp_add(X_MID[i], DOWN[i]), X_OUT[i], "x_out", i);
        end

        $display("layer: layer %0d, position %0d, %0d term(s): %0d words checked (norms, RoPE, attention over %0d positions, SwiGLU, residuals)", META[6], pos, terms, checks, len);
        if (errors == 0 && checks > 0) $display("PASS"); else $display("FAIL: %0d errors", errors);
        $finish;
    end
endmodule
