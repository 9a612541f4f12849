// One Llama decoder layer as a dataflow (docs/hdl.md, "The layer on the mesh"): seven GEMV
// regions (flint_region.v: Q, K, V, O, gate, up, down, each its own mesh holding its weights)
// and the units between them (flint_units.v, flint_attn.v), joined by streams on the link
// protocol. For one token:
//
//   x_in -> resnorm (attn_norm) -> Q, K, V regions -> RoPE q, RoPE k, quantizer v
//        -> attention (K, V appended to its cache, then each head's Q) -> O region
//        -> resnorm (+ o, ffn_norm) -> gate, up regions -> SwiGLU -> down region
//        -> resnorm (+ down) -> x_out
//
// Every region and unit starts with `go`; each takes its input as it arrives and passes its
// output on as it is formed, so the regions overlap wherever the data allows (Q, K and V run
// together, as do gate and up; a region's first rows leave while its PEs still multiply).
// The residual stream's unit runs three steps, each started when the last is done.
//
// Load bus (ld_unit): 0-6 the regions' PEs (ld_pe, ld_addr), 7 the norm weights (attn_norm
// at 0, ffn_norm at n_embd), 8 the RoPE table of the token's position, 9 the K cache, 10 the
// V cache. Configuration (cfg_unit): 0-6 the regions (flint_region.v), 15 the layer's
// registers (cfg_sel 0 n_embd, 1 n_ff, 2 heads, 3 KV heads, 4 heads a KV head, 5 blocks a
// head, 6 RoPE pairs a head, 7 terms, 8 position, 9 eps, 10 score scale).
module flint_decoder #(
    parameter NC = 3,
    parameter QR = 4, parameter QC = 2,
    parameter KR = 2, parameter KC = 2,
    parameter VR = 2, parameter VC = 2,
    parameter OR = 4, parameter OC = 2,
    parameter GR = 6, parameter GC = 3,
    parameter DR = 4, parameter DC = 6,
    parameter MEM_AW = 14,
    parameter ROWS_AW = 8,
    parameter NAW = 13,  // the residual stream's SRAM (x, and both norms' weights)
    parameter SAW = 12,  // SwiGLU's gate and up buffers
    parameter CAW = 17,  // the K and V caches
    parameter PAW = 12   // positions
) (
    input  wire        clk,
    input  wire        rst,
    input  wire        go,
    output reg         done,
    input  wire        ld_we,
    input  wire [3:0]  ld_unit,
    input  wire [15:0] ld_pe,
    input  wire [31:0] ld_addr,
    input  wire [31:0] ld_data,
    input  wire        cfg_we,
    input  wire [3:0]  cfg_unit,
    input  wire [15:0] cfg_pe,
    input  wire [3:0]  cfg_sel,
    input  wire [31:0] cfg_data,
    input  wire        x_valid,
    output wire        x_ready,
    input  wire [31:0] x_data,
    output wire        y_valid,
    input  wire        y_ready,
    output wire [31:0] y_data
);
    reg [31:0] p [0:15];
    always @(posedge clk)
        if (cfg_we && cfg_unit == 4'd15) p[cfg_sel] <= cfg_data;
    wire [15:0] n_embd = p[0][15:0], n_ff = p[1][15:0];
    wire [7:0] heads = p[2][7:0], kv = p[3][7:0], group = p[4][7:0];
    wire [2:0] hb = p[5][2:0];
    wire [7:0] pairs = p[6][7:0];
    wire [1:0] terms = p[7][1:0];

    // The sequencer: everything starts at once; the residual stream's steps one by one.
    reg [1:0] step;
    reg start, rn_go;
    wire rn_done;
    always @(posedge clk) begin
        if (rst) begin
            step <= 0;
            start <= 1'b0;
            rn_go <= 1'b0;
            done <= 1'b0;
        end else begin
            start <= 1'b0;
            rn_go <= 1'b0;
            if (go) begin
                step <= 2'd1;
                start <= 1'b1;
                rn_go <= 1'b1;
                done <= 1'b0;
            end else if (step != 0 && !rn_go && rn_done) begin
                if (step == 2'd3) begin
                    step <= 0;
                    done <= 1'b1;
                end else begin
                    step <= step + 1'b1;
                    rn_go <= 1'b1;
                end
            end
        end
    end

    // Streams: valid, ready, data.
    wire o_v, o_r, d_v, d_r, rn_v, rn_r;
    wire [31:0] o_d, d_d, rn_d;
    wire q_iv, q_ir, k_iv, k_ir, v_iv, v_ir, g_iv, g_ir, u_iv, u_ir;
    wire q_ov, q_or, k_ov, k_or, v_ov, v_or, g_ov, g_or, u_ov, u_or;
    wire [31:0] q_od, k_od, v_od, g_od, u_od;
    wire at_v, at_r, sw_v, sw_r;
    wire [31:0] at_d, sw_d;

    // The residual stream: its input is the layer's x, then o, then down; its output goes
    // to Q, K and V, then to gate and up, then out of the layer.
    wire rn_iv = step == 2'd1 ? x_valid : step == 2'd2 ? o_v : d_v;
    wire [31:0] rn_id = step == 2'd1 ? x_data : step == 2'd2 ? o_d : d_d;
    wire [NC-1:0] rn_ir;
    assign x_ready = step == 2'd1 && rn_ir[0];
    assign o_r = step == 2'd2 && rn_ir[0];
    assign d_r = step == 2'd3 && rn_ir[0];
    wire qkv_r = q_ir && k_ir && v_ir;
    wire gu_r = g_ir && u_ir;
    assign rn_r = step == 2'd1 ? qkv_r : step == 2'd2 ? gu_r : y_ready;
    assign q_iv = rn_v && step == 2'd1 && qkv_r;
    assign k_iv = q_iv;
    assign v_iv = q_iv;
    assign g_iv = rn_v && step == 2'd2 && gu_r;
    assign u_iv = g_iv;
    assign y_valid = rn_v && step == 2'd3;
    assign y_data = rn_d;
    wire [1:0] rn_tc;
    flint_resnorm #(.NC(NC), .AW(NAW)) resnorm (
        .clk(clk), .rst(rst), .go(rn_go), .cfg_n(n_embd), .cfg_add(step != 2'd1), .cfg_norm(step != 2'd3),
        .cfg_terms(terms), .cfg_wbase(step == 2'd2 ? n_embd[NAW-1:0] : {NAW{1'b0}}), .cfg_eps(p[9]), .cfg_colour(2'd0),
        .ld_we(ld_we && ld_unit == 4'd7), .ld_addr(ld_addr[NAW-1:0]), .ld_data(ld_data),
        .rx_valid(rn_iv), .rx_colour(2'd0), .rx_data(rn_id), .rx_ready(rn_ir),
        .tx_valid(rn_v), .tx_colour(rn_tc), .tx_data(rn_d), .tx_ready({{(NC-1){1'b0}}, rn_r}),
        .done(rn_done), .stat_cycles()
    );

    wire [6:0] rdone;
    wire [7*32-1:0] rcyc, rmac;
`define FLINT_REGION(I, NAME, RR, CC, IV, IR, OV, OR_, OD) \
    flint_region #(.R(RR), .C(CC), .NC(NC), .MEM_AW(MEM_AW), .ROWS_AW(ROWS_AW)) NAME ( \
        .clk(clk), .rst(rst), .go(start), \
        .ld_we(ld_we && ld_unit == I), .ld_pe(ld_pe), .ld_addr(ld_addr[MEM_AW-1:0]), .ld_data(ld_data), \
        .cfg_we(cfg_we && cfg_unit == I), .cfg_pe(cfg_pe), .cfg_sel(cfg_sel), .cfg_data(cfg_data), \
        .in_valid(IV), .in_ready(IR), .in_data(I == 3 ? at_d : I == 6 ? sw_d : rn_d), \
        .out_valid(OV), .out_ready(OR_), .out_data(OD), \
        .done(rdone[I]), .stat_cycles(rcyc[I*32 +: 32]), .stat_mac(rmac[I*32 +: 32]));
    `FLINT_REGION(0, r_q, QR, QC, q_iv, q_ir, q_ov, q_or, q_od)
    `FLINT_REGION(1, r_k, KR, KC, k_iv, k_ir, k_ov, k_or, k_od)
    `FLINT_REGION(2, r_v, VR, VC, v_iv, v_ir, v_ov, v_or, v_od)
    `FLINT_REGION(3, r_o, OR, OC, at_v, at_r, o_v, o_r, o_d)
    `FLINT_REGION(4, r_gate, GR, GC, g_iv, g_ir, g_ov, g_or, g_od)
    `FLINT_REGION(5, r_up, GR, GC, u_iv, u_ir, u_ov, u_or, u_od)
    `FLINT_REGION(6, r_down, DR, DC, sw_v, sw_r, d_v, d_r, d_d)
`undef FLINT_REGION

    // RoPE on q and k (the table loaded for the position into both), the quantizer on v.
    wire rq_v, rk_v, rv_v;
    wire [31:0] rq_d, rk_d, rv_d;
    wire [NC-1:0] rq_ir, rk_ir, rv_ir, at_ir;
    wire [1:0] rq_c, rk_c, rv_c;
    assign q_or = rq_ir[0];
    assign k_or = rk_ir[0];
    assign v_or = rv_ir[0];
    // Into attention: K (colour 0) and V (colour 1) first, then Q (colour 2), by priority.
    wire gk = rk_v && at_ir[0];
    wire gv = !gk && rv_v && at_ir[1];
    wire gq = !gk && !gv && rq_v && at_ir[2];
    wire [15:0] qn = heads * hb * 32, kn = kv * hb * 32;
    flint_rope #(.NC(NC), .AW(8)) rope_q (
        .clk(clk), .rst(rst), .go(start), .cfg_n(qn), .cfg_rot(1'b1), .cfg_pairs(pairs),
        .cfg_terms(terms), .cfg_colour(2'd0),
        .ld_we(ld_we && ld_unit == 4'd8), .ld_addr(ld_addr[8:0]), .ld_data(ld_data),
        .rx_valid(q_ov), .rx_colour(2'd0), .rx_data(q_od), .rx_ready(rq_ir),
        .tx_valid(rq_v), .tx_colour(rq_c), .tx_data(rq_d), .tx_ready({{(NC-1){1'b0}}, at_ir[2] && !gk && !gv}),
        .done(), .stat_cycles()
    );
    flint_rope #(.NC(NC), .AW(8)) rope_k (
        .clk(clk), .rst(rst), .go(start), .cfg_n(kn), .cfg_rot(1'b1), .cfg_pairs(pairs),
        .cfg_terms(terms), .cfg_colour(2'd0),
        .ld_we(ld_we && ld_unit == 4'd8), .ld_addr(ld_addr[8:0]), .ld_data(ld_data),
        .rx_valid(k_ov), .rx_colour(2'd0), .rx_data(k_od), .rx_ready(rk_ir),
        .tx_valid(rk_v), .tx_colour(rk_c), .tx_data(rk_d), .tx_ready({{(NC-1){1'b0}}, at_ir[0]}),
        .done(), .stat_cycles()
    );
    flint_rope #(.NC(NC), .AW(8)) quant_v (
        .clk(clk), .rst(rst), .go(start), .cfg_n(kn), .cfg_rot(1'b0), .cfg_pairs(pairs),
        .cfg_terms(terms), .cfg_colour(2'd0),
        .ld_we(1'b0), .ld_addr(9'd0), .ld_data(32'd0),
        .rx_valid(v_ov), .rx_colour(2'd0), .rx_data(v_od), .rx_ready(rv_ir),
        .tx_valid(rv_v), .tx_colour(rv_c), .tx_data(rv_d), .tx_ready({{(NC-1){1'b0}}, at_ir[1] && !gk}),
        .done(), .stat_cycles()
    );

    wire [1:0] at_tc;
    wire at_done;
    flint_attn #(.NC(NC), .CAW(CAW), .PAW(PAW)) attn (
        .clk(clk), .rst(rst), .go(start), .cfg_heads(heads), .cfg_group(group), .cfg_kv(kv),
        .cfg_hb(hb), .cfg_terms(terms), .cfg_oterms(terms), .cfg_pos(p[8][PAW-1:0]),
        .cfg_scale(p[10]), .cfg_colour(2'd0),
        .ld_we(ld_we && (ld_unit == 4'd9 || ld_unit == 4'd10)), .ld_v(ld_unit == 4'd10),
        .ld_addr(ld_addr[CAW-1:0]), .ld_data(ld_data),
        .rx_valid(gk || gv || gq), .rx_colour(gk ? 2'd0 : gv ? 2'd1 : 2'd2), .rx_data(gk ? rk_d : gv ? rv_d : rq_d),
        .rx_ready(at_ir),
        .tx_valid(at_v), .tx_colour(at_tc), .tx_data(at_d), .tx_ready({{(NC-1){1'b0}}, at_r}),
        .done(at_done), .stat_cycles()
    );

    // SwiGLU: gate on colour 0, up on colour 1, whichever is there.
    wire [NC-1:0] sw_ir;
    wire [1:0] sw_tc;
    wire sg = g_ov && sw_ir[0];
    wire su = !sg && u_ov && sw_ir[1];
    assign g_or = sw_ir[0];
    assign u_or = sw_ir[1] && !sg;
    flint_swiglu #(.NC(NC), .AW(SAW)) swiglu (
        .clk(clk), .rst(rst), .go(start), .cfg_n(n_ff), .cfg_terms(terms), .cfg_colour(2'd0),
        .rx_valid(sg || su), .rx_colour(sg ? 2'd0 : 2'd1), .rx_data(sg ? g_od : u_od), .rx_ready(sw_ir),
        .tx_valid(sw_v), .tx_colour(sw_tc), .tx_data(sw_d), .tx_ready({{(NC-1){1'b0}}, sw_r}),
        .done(), .stat_cycles()
    );
endmodule
