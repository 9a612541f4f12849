// Attention over a Q8_0 KV cache held in this unit's SRAM (docs/hdl.md, "The decoder layer"),
// with a router local port's shape (flint_units.v). One step for the token at cfg_pos:
//
//   append  the token's K blocks (colour 0) and V blocks (colour 1), in any interleaving,
//           written to the cache at position cfg_pos (the positions before it are there);
//   per head h (query group g = h / cfg_group):
//     q      the head's Q blocks (colour 2);
//     scores for each position j, the exact dot product of q and K_j over every pair of
//            terms, one word (four int8 MACs) a cycle, rounded once, times the score scale;
//            the max as it goes;
//     sums   for each position, P_j = round(2^(t_j - max) * 2^24), S += P_j, and A += P_j V_j
//            (four values a cycle, exact, in units of 2^-48);
//     out    one reciprocal of S, then A_i / S for the head's values, into the quantizer
//            (cfg_oterms terms: the O GEMV's input).
//
// The cache's layout in SRAM: position-major, then the step's stream order (block by block,
// a block's terms one after the other, 9 words each). Every sum is an exact integer, so a
// split of the positions over several such units needs only a max and two integer sums.
module flint_attn #(
    parameter NC = 3,
    parameter CAW = 17,  // log2 words of each of the K and V caches
    parameter PAW = 12   // log2 positions (the scores' SRAM)
) (
    input  wire           clk,
    input  wire           rst,
    input  wire           go,
    input  wire [7:0]     cfg_heads,
    input  wire [7:0]     cfg_group,   // query heads per KV head
    input  wire [7:0]     cfg_kv,      // KV heads
    input  wire [2:0]     cfg_hb,      // blocks per head (at most 4: head size 128)
    input  wire [1:0]     cfg_terms,   // of the cached and incoming vectors (1 or 2)
    input  wire [1:0]     cfg_oterms,
    input  wire [PAW-1:0] cfg_pos,
    input  wire [31:0]    cfg_scale,
    input  wire [1:0]     cfg_colour,
    input  wire           ld_we,
    input  wire           ld_v,        // 0: the K cache, 1: the V cache
    input  wire [CAW-1:0] ld_addr,
    input  wire [31:0]    ld_data,
    input  wire           rx_valid,
    input  wire [1:0]     rx_colour,
    input  wire [31:0]    rx_data,
    output wire [NC-1:0]  rx_ready,
    output wire           tx_valid,
    output wire [1:0]     tx_colour,
    output wire [31:0]    tx_data,
    input  wire [NC-1:0]  tx_ready,
    output reg            done,
    output reg  [31:0]    stat_cycles
);
    `include "flint_numeric.vh"
    `include "flint_fp.vh"
    `include "flint_layer.vh"
    localparam S_IDLE = 3'd0, S_APPEND = 3'd1, S_Q = 3'd2, S_SCORE = 3'd3, S_P = 3'd4, S_PV = 3'd5,
               S_FIN = 3'd6, S_OUT = 3'd7;
    reg [31:0] km [0:(1<<CAW)-1];
    reg [31:0] vm [0:(1<<CAW)-1];
    reg [31:0] tm [0:(1<<PAW)-1];
    reg [31:0] qb [0:71];
    reg [127:0] A [0:127];

    reg [2:0] state;
    reg fin;                     // the step's last head is out: wait for the quantizer
    reg [CAW-1:0] rw;            // words a position: terms * kv * hb * 9
    reg [CAW-1:0] kc, vc;        // append counters
    reg [6:0] qc;                // Q words in
    reg [7:0] h, hg;             // head, and its place in its group
    reg [CAW-1:0] gbase;         // the group's first word within a position
    reg [PAW-1:0] j;
    reg [CAW-1:0] jbase;         // position j's first word
    reg [1:0] qt, kt;
    reg [2:0] b;
    reg [3:0] w;
    reg signed [20:0] psum;
    reg [127:0] acc, s;
    reg [31:0] m, inv;
    reg [24:0] p;
    reg [15:0] vd;
    reg [6:0] o;

    wire [6:0] qwords = cfg_terms * cfg_hb * 9;
    // Word w of block b, term t, of the group, at position j (stream order within a position).
    wire [CAW-1:0] kaddr = jbase + gbase + (b * cfg_terms + kt) * 9 + w;
    wire [CAW-1:0] vaddr = jbase + gbase + (b * cfg_terms + qt) * 9 + (w == 0 ? 4'd8 : w - 1'b1);
    wire [6:0] qaddr = (b * cfg_terms + qt) * 9 + w;
    wire [31:0] kw = km[kaddr];
    wire [31:0] vw = vm[vaddr];
    wire [31:0] qw = qb[qaddr];
    wire [127:0] acc_j = acc + q8_term(psum, kw[15:0], qw[15:0]);
    wire [31:0] t_j = fp_mul(acc_to_f32(acc_j), cfg_scale);
    // t_j > m for f32 values without NaNs (m is -infinity before the first).
    wire t_gt = (!t_j[31] && (m[31] || t_j[30:0] > m[30:0])) || (t_j[31] && m[31] && t_j[30:0] < m[30:0]);
    wire last_sub_k = kt + 1'b1 == cfg_terms && b + 1'b1 == cfg_hb && qt + 1'b1 == cfg_terms;
    wire last_sub_v = b + 1'b1 == cfg_hb && qt + 1'b1 == cfg_terms;
    wire last_j = j == cfg_pos;
    wire [6:0] ai = b * 32 + (w - 1'b1) * 4;
    wire pv_first = j == 0 && qt == 0;
    wire [24:0] p_j = softmax_p(tm[j], m);
    wire [31:0] out_v = fp_mul(acc_to_f32(A[o]), inv);
    wire q_ready, q_idle;
    wire hd_last = o + 1'b1 == cfg_hb * 32;

    assign rx_ready = {state == S_Q && qc != qwords, state == S_APPEND && vc != rw, state == S_APPEND && kc != rw};
    assign tx_colour = cfg_colour;

    flint_q8s q8 (
        .clk(clk), .rst(rst), .terms(cfg_oterms),
        .in_valid(state == S_OUT && !fin), .in_ready(q_ready), .in_data(out_v),
        .out_valid(tx_valid), .out_ready(tx_ready[cfg_colour]), .out_data(tx_data), .idle(q_idle)
    );

    always @(posedge clk) begin
        if (ld_we && !ld_v) km[ld_addr] <= ld_data;
        if (ld_we && ld_v) vm[ld_addr] <= ld_data;
        if (rst) begin
            state <= S_IDLE;
            done <= 1'b0;
            stat_cycles <= 0;
        end else if (go) begin
            state <= S_APPEND;
            done <= 1'b0;
            fin <= 1'b0;
            rw <= cfg_terms * cfg_kv * cfg_hb * 9;
            jbase <= cfg_pos * (cfg_terms * cfg_kv * cfg_hb * 9);
            kc <= 0;
            vc <= 0;
            qc <= 0;
            h <= 0;
            hg <= 0;
            gbase <= 0;
            stat_cycles <= 0;
        end else begin
            if (state != S_IDLE && !done)
                stat_cycles <= stat_cycles + 1;
            case (state)
                S_APPEND: begin
                    if (rx_valid && rx_colour == 2'd0 && rx_ready[0]) begin
                        km[jbase + kc] <= rx_data;
                        kc <= kc + 1'b1;
                    end
                    if (rx_valid && rx_colour == 2'd1 && rx_ready[1]) begin
                        vm[jbase + vc] <= rx_data;
                        vc <= vc + 1'b1;
                    end
                    if (kc == rw && vc == rw) state <= S_Q;
                end
                S_Q: if (rx_valid && rx_colour == 2'd2 && rx_ready[2]) begin
                    qb[qc] <= rx_data;
                    if (qc + 1'b1 == qwords) begin
                        state <= S_SCORE;
                        j <= 0;
                        jbase <= 0;
                        qt <= 0; kt <= 0; b <= 0; w <= 0;
                        acc <= 0;
                        m <= 32'hff800000;
                    end
                    qc <= qc + 1'b1;
                end
                S_SCORE: begin
                    // Words 0-7 of a block pair: four MACs each; word 8: the scales, the term.
                    if (w != 8) begin
                        psum <= (w == 0 ? 21'sd0 : psum) + dot4(kw, qw);
                        w <= w + 1'b1;
                    end else begin
                        w <= 0;
                        if (last_sub_k) begin
                            tm[j] <= t_j;
                            if (j == 0 || t_gt) m <= t_j;
                            acc <= 0;
                            {qt, kt, b} <= 0;
                            if (last_j) begin
                                state <= S_P;
                                j <= 0;
                                jbase <= 0;
                                s <= 0;
                            end else begin
                                j <= j + 1'b1;
                                jbase <= jbase + rw;
                            end
                        end else begin
                            acc <= acc_j;
                            // Next: the K term, then the block, then the Q term.
                            if (kt + 1'b1 != cfg_terms) kt <= kt + 1'b1;
                            else begin
                                kt <= 0;
                                if (b + 1'b1 != cfg_hb) b <= b + 1'b1;
                                else begin b <= 0; qt <= qt + 1'b1; end
                            end
                        end
                    end
                end
                S_P: begin
                    p <= p_j;
                    s <= s + p_j;
                    state <= S_PV;
                    {qt, b, w} <= 0;
                end
                S_PV: begin
                    // Word 0 of a step is the V block's scale, then its 8 words of values.
                    // Four values a cycle; the first position's first term starts the sums.
                    if (w == 0) vd <= vw[15:0];
                    else begin
                        A[ai]     <= (pv_first ? 128'd0 : A[ai])     + pv_term(p, vw[7:0], vd);
                        A[ai + 1] <= (pv_first ? 128'd0 : A[ai + 1]) + pv_term(p, vw[15:8], vd);
                        A[ai + 2] <= (pv_first ? 128'd0 : A[ai + 2]) + pv_term(p, vw[23:16], vd);
                        A[ai + 3] <= (pv_first ? 128'd0 : A[ai + 3]) + pv_term(p, vw[31:24], vd);
                    end
                    if (w != 8) w <= w + 1'b1;
                    else begin
                        w <= 0;
                        if (last_sub_v) begin
                            {qt, b} <= 0;
                            if (last_j) state <= S_FIN;
                            else begin
                                j <= j + 1'b1;
                                jbase <= jbase + rw;
                                state <= S_P;
                            end
                        end else if (b + 1'b1 != cfg_hb) b <= b + 1'b1;
                        else begin b <= 0; qt <= qt + 1'b1; end
                    end
                end
                S_FIN: begin
                    inv <= fp_div(FP_ONE, acc_to_f32(s << 24));
                    o <= 0;
                    state <= S_OUT;
                end
                S_OUT: begin
                    if (!fin && q_ready) begin
                        o <= o + 1'b1;
                        if (hd_last) begin
                            if (h + 1'b1 == cfg_heads) fin <= 1'b1;
                            else begin
                                // The next head: its Q, then the same cache (its group's).
                                h <= h + 1'b1;
                                qc <= 0;
                                state <= S_Q;
                                if (hg + 1'b1 == cfg_group) begin
                                    hg <= 0;
                                    gbase <= gbase + cfg_terms * cfg_hb * 9;
                                end else hg <= hg + 1'b1;
                            end
                        end
                    end
                    if (fin && q_idle) done <= 1'b1;
                end
                default: ;
            endcase
        end
    end
endmodule
