// The decoder layer's units between the GEMVs (docs/hdl.md, "The decoder layer"), as stream
// modules with a router local port's shape: valid, a 2-bit colour and 32 data bits in, one
// ready bit per colour back, and the same out. Each can sit on a mesh router in place of a
// PE's GEMV core. A unit takes at most one word a cycle and sends at most one; the arithmetic
// on each element is the contract's functions (flint_fp.vh, flint_layer.vh), one element a
// cycle, so a unit's cycles are its words in and out plus its one-off steps.
//
//   flint_q8s      the Q8_0 quantizer on a stream: 1 or 2 terms (0 passes f32 through)
//   flint_resnorm  the residual stream: holds x, adds an op's output into it, RMSNorm
//   flint_rope     RoPE's rotation of q or k (none for v), then the quantizer
//   flint_swiglu   gate (colour 0) and up (colour 1) to SwiGLU, then the quantizer
//
// 8-bit vectors leave a unit block by block, a block's terms one after the other (term 0's 9
// words, then term 1's): the order a PE consumes them in, both terms against one weight block.

module flint_q8s (
    input  wire        clk,
    input  wire        rst,
    input  wire [1:0]  terms,
    input  wire        in_valid,
    output wire        in_ready,
    input  wire [31:0] in_data,
    output wire        out_valid,
    input  wire        out_ready,
    output wire [31:0] out_data,
    output wire        idle
);
    `include "flint_numeric.vh"
    `include "flint_fp.vh"
    `include "flint_layer.vh"
    // Filling: the next block's values and their largest magnitude so far.
    reg [1023:0] xf;
    reg [4:0] k;
    reg [30:0] amax;
    // Sending: a full block (term 0's values, then the residuals for term 1), its d and 1/d,
    // the word (0-7: four values each, 8: the scale), and the residuals being formed.
    reg [1023:0] xe, xr;
    reg [31:0] d, id;
    reg [30:0] ramax;
    reg busy, t1;
    reg [3:0] wi;
    wire pass = terms == 2'd0;
    // The 32nd value waits until the last block is out: its words go out while the next 31
    // values come in.
    assign in_ready = pass ? out_ready : (k != 5'd31 || !busy);
    wire fill_done = !pass && in_valid && in_ready && k == 5'd31;
    assign idle = k == 0 && !busy;

    // One scale step, shared by a new block and a block's second term: d = amax / 127,
    // id = 1 / d (0 for d = 0).
    wire [30:0] amax_new = (in_data[30:0] > amax) ? in_data[30:0] : amax;
    wire [31:0] d_next = fp_div({1'b0, fill_done ? amax_new : ramax}, FP_127);
    wire [31:0] id_next = (d_next == 0) ? 32'd0 : fp_div(FP_ONE, d_next);

    // Word wi's four values, quantized, and what they leave for term 1 (x - d16 * q, d16 the
    // scale as the block stores it).
    wire [31:0] d16 = fp_from_f16(fp_to_f16(d));
    reg [31:0] qword;
    reg [127:0] rword;
    reg [30:0] ramax_next;
    reg [7:0] qv, qa;
    integer l;
    always @* begin
        ramax_next = ramax;
        for (l = 0; l < 4; l = l + 1) begin
            qv = fp_round_i8(fp_mul(xe[32*(4*wi + l) +: 32], id));
            qa = qv[7] ? -qv : qv;
            qword[8*l +: 8] = qv;
            rword[32*l +: 32] = fp_add(xe[32*(4*wi + l) +: 32], fp_neg(fp_mul(d16, fp_pack(qv[7], {56'd0, qa}, 0))));
            if (rword[32*l +: 31] > ramax_next) ramax_next = rword[32*l +: 31];
        end
    end
    assign out_valid = pass ? in_valid : busy;
    assign out_data = pass ? in_data : (wi == 4'd8 ? {16'd0, fp_to_f16(d)} : qword);

    always @(posedge clk) begin
        if (rst) begin
            k <= 0;
            amax <= 0;
            busy <= 1'b0;
        end else begin
            if (busy && out_ready) begin
                if (wi != 4'd8) begin
                    xr[128*wi +: 128] <= rword;
                    ramax <= ramax_next;
                    wi <= wi + 1'b1;
                end else if (!t1 && terms == 2'd2) begin
                    // Term 1: the residuals, with their own scale.
                    xe <= xr;
                    d <= d_next;
                    id <= id_next;
                    t1 <= 1'b1;
                    wi <= 0;
                end else begin
                    busy <= 1'b0;
                end
            end
            if (!pass && in_valid && in_ready) begin
                if (fill_done) begin
                    xe <= {in_data, xf[991:0]};
                    d <= d_next;
                    id <= id_next;
                    busy <= 1'b1;
                    t1 <= 1'b0;
                    wi <= 0;
                    ramax <= 0;
                    amax <= 0;
                end else begin
                    xf[32*k +: 32] <= in_data;
                    amax <= amax_new;
                end
                k <= k + 1'b1;
            end
        end
    end
endmodule

// The residual stream of a layer: x (cfg_n f32 values) stays in this unit's SRAM between
// the layer's steps. Each step takes cfg_n values on colour 0: x = input (cfg_add 0) or
// x = x + input (cfg_add 1: the residual add of an op's output). Then, with cfg_norm, it
// sends RMSNorm(x) with the weights at cfg_wbase of its weight SRAM (both norms' weights
// are loaded at start), quantized in cfg_terms terms; without, x itself as f32. A layer is
// three steps: x_in -> attn_in; + o -> ffn_in; + down -> x_out.
module flint_resnorm #(
    parameter NC = 3,
    parameter AW = 13
) (
    input  wire          clk,
    input  wire          rst,
    input  wire          go,
    input  wire [15:0]   cfg_n,
    input  wire          cfg_add,
    input  wire          cfg_norm,
    input  wire [1:0]    cfg_terms,
    input  wire [AW-1:0] cfg_wbase,
    input  wire [31:0]   cfg_eps,
    input  wire [1:0]    cfg_colour,
    input  wire          ld_we,
    input  wire [AW-1:0] ld_addr,
    input  wire [31:0]   ld_data,
    input  wire          rx_valid,
    input  wire [1:0]    rx_colour,
    input  wire [31:0]   rx_data,
    output wire [NC-1:0] rx_ready,
    output wire          tx_valid,
    output wire [1:0]    tx_colour,
    output wire [31:0]   tx_data,
    input  wire [NC-1:0] tx_ready,
    output reg           done,
    output reg  [31:0]   stat_cycles
);
    `include "flint_numeric.vh"
    `include "flint_fp.vh"
    `include "flint_layer.vh"
    localparam S_IDLE = 3'd0, S_IN = 3'd1, S_SCALE = 3'd2, S_OUT = 3'd3, S_DRAIN = 3'd4, S_DONE = 3'd5;
    reg [31:0] xm [0:(1<<AW)-1];
    reg [31:0] wm [0:(1<<AW)-1];
    reg [2:0] state;
    reg [15:0] i;
    reg [127:0] s;
    reg [31:0] inv, v;
    wire q_ready, q_idle;
    wire fire = rx_valid && rx_colour == 2'd0 && rx_ready[0];
    assign rx_ready = {{(NC-1){1'b0}}, state == S_IN};
    assign tx_colour = cfg_colour;

    flint_q8s q8 (
        .clk(clk), .rst(rst), .terms(cfg_norm ? cfg_terms : 2'd0),
        .in_valid(state == S_OUT), .in_ready(q_ready),
        .in_data(cfg_norm ? fp_mul(fp_mul(xm[i], inv), wm[cfg_wbase + i]) : xm[i]),
        .out_valid(tx_valid), .out_ready(tx_ready[cfg_colour]), .out_data(tx_data), .idle(q_idle)
    );

    always @(posedge clk) begin
        if (ld_we)
            wm[ld_addr] <= ld_data;
        if (rst) begin
            state <= S_IDLE;
            done <= 1'b0;
            stat_cycles <= 0;
        end else if (go) begin
            state <= cfg_n == 0 ? S_DONE : S_IN;
            done <= 1'b0;
            i <= 0;
            s <= 0;
            stat_cycles <= 0;
        end else begin
            if (state != S_IDLE && state != S_DONE)
                stat_cycles <= stat_cycles + 1;
            case (state)
                S_IN: if (fire) begin
                    v = cfg_add ? fp_add(xm[i], rx_data) : rx_data;
                    xm[i] <= v;
                    s <= s + sq_units(v);
                    if (i + 1'b1 == cfg_n) begin
                        i <= 0;
                        state <= cfg_norm ? S_SCALE : S_OUT;
                    end else begin
                        i <= i + 1'b1;
                    end
                end
                S_SCALE: begin
                    inv <= norm_scale(s, {16'd0, cfg_n}, cfg_eps);
                    state <= S_OUT;
                end
                S_OUT: if (q_ready) begin
                    if (i + 1'b1 == cfg_n) state <= S_DRAIN;
                    i <= i + 1'b1;
                end
                S_DRAIN: if (q_idle) state <= S_DONE;
                S_DONE: done <= 1'b1;
                default: ;
            endcase
        end
    end
endmodule

// RoPE on a stream of heads (colour 0): cfg_n values, adjacent pairs (a, b) rotated by the
// table's (cos, sin) of pair j within the head (cfg_pairs pairs a head; the table, 2 words a
// pair, is loaded for the token's position). cfg_rot 0 passes the values (v). Then the
// quantizer. A pair's second value waits one cycle in `pend` while the first goes out.
module flint_rope #(
    parameter NC = 3,
    parameter AW = 8
) (
    input  wire          clk,
    input  wire          rst,
    input  wire          go,
    input  wire [15:0]   cfg_n,
    input  wire          cfg_rot,
    input  wire [AW-1:0] cfg_pairs,
    input  wire [1:0]    cfg_terms,
    input  wire [1:0]    cfg_colour,
    input  wire          ld_we,
    input  wire [AW:0]   ld_addr,
    input  wire [31:0]   ld_data,
    input  wire          rx_valid,
    input  wire [1:0]    rx_colour,
    input  wire [31:0]   rx_data,
    output wire [NC-1:0] rx_ready,
    output wire          tx_valid,
    output wire [1:0]    tx_colour,
    output wire [31:0]   tx_data,
    input  wire [NC-1:0] tx_ready,
    output reg           done,
    output reg  [31:0]   stat_cycles
);
    `include "flint_numeric.vh"
    `include "flint_fp.vh"
    `include "flint_layer.vh"
    localparam S_IDLE = 2'd0, S_IN = 2'd1, S_DRAIN = 2'd2, S_DONE = 2'd3;
    reg [31:0] tm [0:(2<<AW)-1];
    reg [1:0] state;
    reg [15:0] i;
    reg [AW-1:0] pj;
    reg odd, pend_v;
    reg [31:0] a, pend;
    wire q_ready, q_idle;
    wire in_v = state == S_IN && rx_valid && rx_colour == 2'd0 && i != cfg_n;
    wire [63:0] pr = rope_pair(a, rx_data, tm[{pj, 1'b0}], tm[{pj, 1'b1}]);
    // Into the quantizer: the pending second value of a pair, else an odd input's rotated
    // first value, else (no rotation) the input.
    wire q_valid = pend_v || (in_v && (cfg_rot ? odd : 1'b1));
    wire [31:0] q_data = pend_v ? pend : (cfg_rot ? pr[63:32] : rx_data);
    // An even input needs the quantizer only to free `pend`; an odd one (or any, unrotated)
    // goes straight in.
    wire take = state == S_IN && i != cfg_n && (cfg_rot ? (pend_v ? q_ready : (!odd || q_ready)) : q_ready);
    wire fire = in_v && take;
    assign rx_ready = {{(NC-1){1'b0}}, take};
    assign tx_colour = cfg_colour;

    flint_q8s q8 (
        .clk(clk), .rst(rst), .terms(cfg_terms),
        .in_valid(q_valid), .in_ready(q_ready), .in_data(q_data),
        .out_valid(tx_valid), .out_ready(tx_ready[cfg_colour]), .out_data(tx_data), .idle(q_idle)
    );

    always @(posedge clk) begin
        if (ld_we)
            tm[ld_addr] <= ld_data;
        if (rst) begin
            state <= S_IDLE;
            done <= 1'b0;
            stat_cycles <= 0;
            pend_v <= 1'b0;
        end else if (go) begin
            state <= cfg_n == 0 ? S_DONE : S_IN;
            done <= 1'b0;
            i <= 0;
            pj <= 0;
            odd <= 1'b0;
            pend_v <= 1'b0;
            stat_cycles <= 0;
        end else begin
            if (state != S_IDLE && state != S_DONE)
                stat_cycles <= stat_cycles + 1;
            if (pend_v && q_ready)
                pend_v <= 1'b0;
            if (fire) begin
                i <= i + 1'b1;
                if (cfg_rot) begin
                    odd <= !odd;
                    if (!odd) begin
                        a <= rx_data;
                    end else begin
                        pend <= pr[31:0];
                        pend_v <= 1'b1;
                        pj <= (pj + 1'b1 == cfg_pairs) ? {AW{1'b0}} : pj + 1'b1;
                    end
                end
            end
            case (state)
                S_IN: if (i == cfg_n && !pend_v) state <= S_DRAIN;
                S_DRAIN: if (q_idle) state <= S_DONE;
                S_DONE: done <= 1'b1;
                default: ;
            endcase
        end
    end
endmodule

// SwiGLU: gate values on colour 0 and up values on colour 1, in any interleaving (each side
// is kept in SRAM until its partner arrives, so the gate and up regions may run apart by
// the whole vector), then (g * sigmoid(g)) * u element by element into the quantizer.
module flint_swiglu #(
    parameter NC = 3,
    parameter AW = 11
) (
    input  wire          clk,
    input  wire          rst,
    input  wire          go,
    input  wire [15:0]   cfg_n,
    input  wire [1:0]    cfg_terms,
    input  wire [1:0]    cfg_colour,
    input  wire          rx_valid,
    input  wire [1:0]    rx_colour,
    input  wire [31:0]   rx_data,
    output wire [NC-1:0] rx_ready,
    output wire          tx_valid,
    output wire [1:0]    tx_colour,
    output wire [31:0]   tx_data,
    input  wire [NC-1:0] tx_ready,
    output reg           done,
    output reg  [31:0]   stat_cycles
);
    `include "flint_numeric.vh"
    `include "flint_fp.vh"
    `include "flint_layer.vh"
    localparam S_IDLE = 2'd0, S_RUN = 2'd1, S_DRAIN = 2'd2, S_DONE = 2'd3;
    reg [31:0] gm [0:(1<<AW)-1];
    reg [31:0] um [0:(1<<AW)-1];
    reg [1:0] state;
    reg [15:0] ca, cb, pi;
    wire q_ready, q_idle;
    wire q_valid = state == S_RUN && pi < ca && pi < cb;
    assign rx_ready = {{(NC-2){1'b0}}, state == S_RUN && cb != cfg_n, state == S_RUN && ca != cfg_n};
    assign tx_colour = cfg_colour;

    flint_q8s q8 (
        .clk(clk), .rst(rst), .terms(cfg_terms),
        .in_valid(q_valid), .in_ready(q_ready), .in_data(swiglu1(gm[pi], um[pi])),
        .out_valid(tx_valid), .out_ready(tx_ready[cfg_colour]), .out_data(tx_data), .idle(q_idle)
    );

    always @(posedge clk) begin
        if (rst) begin
            state <= S_IDLE;
            done <= 1'b0;
            stat_cycles <= 0;
        end else if (go) begin
            state <= cfg_n == 0 ? S_DONE : S_RUN;
            done <= 1'b0;
            ca <= 0;
            cb <= 0;
            pi <= 0;
            stat_cycles <= 0;
        end else begin
            if (state != S_IDLE && state != S_DONE)
                stat_cycles <= stat_cycles + 1;
            if (rx_valid && rx_colour == 2'd0 && rx_ready[0]) begin
                gm[ca] <= rx_data;
                ca <= ca + 1'b1;
            end
            if (rx_valid && rx_colour == 2'd1 && rx_ready[1]) begin
                um[cb] <= rx_data;
                cb <= cb + 1'b1;
            end
            if (q_valid && q_ready)
                pi <= pi + 1'b1;
            case (state)
                S_RUN: if (pi == cfg_n) state <= S_DRAIN;
                S_DRAIN: if (q_idle) state <= S_DONE;
                S_DONE: done <= 1'b1;
                default: ;
            endcase
        end
    end
endmodule
