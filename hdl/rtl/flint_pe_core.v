// A PE's compute unit: holds its weight tile (rows x blocks, row-major) in local SRAM and
// takes its activation blocks on colour 0 into a buffer as fast as they arrive (2^ACT_AW
// words: a column's blocks pass at link rate, so the next column's start without waiting for
// this one's MACs); for each block, as soon as it is in, every row's block
// product is formed (one weight word a cycle) and added exactly into the row's 128-bit
// accumulator. Weights are Q8_0 (9 words a block: 8 of four int8 values, four MACs a word,
// then the f16 scale) or, with cfg_q4, Q4_1 as the model stores them (5 words: 4 of eight
// nibbles, element 8i + j at bits 4j of word i, eight MACs a word, then {m, d} as f16s);
// a Q4_1 block's product is T(sum q_w q_a; d, d_a) + T(sum q_a; m, d_a). With cfg_t2 the
// activation arrives in two Q8_0 terms (a block's 9 words of term 0, then term 1's: the
// layer contract's two-term vectors) and both are multiplied by the same weight block, read
// twice, into the one exact accumulator. Then the reduction: unless it
// is first in its mesh row, it takes each row's partial sum from the west (colour 1, four
// words, low first), adds its own, and sends it east (colour 1) or, last in the mesh row,
// rounds it to f32 and sends the result (colour 2).
module flint_pe_core #(
    parameter NC = 3,
    parameter MEM_AW = 12,
    parameter ROWS_AW = 6,
    parameter ACT_AW = 9
) (
    input  wire              clk,
    input  wire              rst,
    input  wire              go,
    input  wire              ld_we,
    input  wire [MEM_AW-1:0] ld_addr,
    input  wire [31:0]       ld_data,
    input  wire [ROWS_AW:0]  cfg_rows,
    input  wire [15:0]       cfg_blocks,
    input  wire              cfg_first,
    input  wire              cfg_last,
    input  wire              cfg_q4,
    input  wire              cfg_t2,
    input  wire              rx_valid,
    input  wire [1:0]        rx_colour,
    input  wire [31:0]       rx_data,
    output reg  [NC-1:0]     rx_ready,
    output reg               tx_valid,
    output reg  [1:0]        tx_colour,
    output reg  [31:0]       tx_data,
    input  wire [NC-1:0]     tx_ready,
    output reg               done,
    output reg  [31:0]       stat_mac,
    output reg  [31:0]       stat_cycles
);
    `include "flint_numeric.vh"

    localparam S_IDLE = 3'd0, S_ACT = 3'd1, S_MAC = 3'd2, S_RX = 3'd3, S_TX = 3'd4, S_DONE = 3'd5;

    reg [31:0] mem [0:(1<<MEM_AW)-1];
    reg [31:0] mem_q;
    reg [MEM_AW-1:0] rd_addr;
    reg [127:0] acc [0:(1<<ROWS_AW)-1];
    reg [31:0] abm [0:(1<<ACT_AW)-1];        // the activation blocks, as they arrived
    reg signed [20:0] abs [0:(1<<ACT_AW)/8]; // each block term's sum of values (Q4_1's m term)
    reg [ACT_AW:0] ar;         // activation words in
    reg [3:0] aw;              // word within the term coming in
    reg [ACT_AW:0] arb;        // block terms in
    reg signed [20:0] asr;     // the running sum of the term coming in
    reg [ACT_AW:0] abase;      // the current block's first word in abm
    reg [ACT_AW:0] bt0;        // the current block's first term in abs

    reg [2:0] state;
    reg [3:0] k;               // word within a block (MAC), word of a partial sum (RX, TX)
    reg [ROWS_AW:0] row;
    reg [15:0] blk;
    reg [MEM_AW-1:0] row_addr; // SRAM address of (row, blk), word 0
    reg [MEM_AW-1:0] stride;   // blocks * 9: from one row to the next
    reg signed [20:0] psum;
    reg tt;                    // the activation term being multiplied (cfg_t2)
    reg [127:0] sum;
    wire [3:0] bw = cfg_q4 ? 4'd5 : 4'd9; // words a weight block

    wire act_in = rx_valid && rx_colour == 2'd0 && rx_ready[0];
    wire [4:0] wpb = cfg_t2 ? 5'd18 : 5'd9;  // activation words a block
    wire [ACT_AW+16:0] act_words = cfg_blocks * wpb;
    wire blk_in = ar >= abase + wpb;         // the current block is all in
    wire signed [20:0] sum4 = $signed(rx_data[7:0]) + $signed(rx_data[15:8]) + $signed(rx_data[23:16]) + $signed(rx_data[31:24]);
    wire part_in = rx_valid && rx_colour == 2'd1 && rx_ready[1];
    wire tx_fire = tx_valid && tx_ready[tx_colour];
    wire [ACT_AW:0] ao = abase + (tt ? 5'd9 : 5'd0); // the term's first word in abm
    wire [31:0] ad = abm[ao + 5'd8];
    wire [127:0] term = q8_term(psum, mem_q[15:0], ad[15:0])
                      + (cfg_q4 ? q8_term(abs[bt0 + tt], mem_q[31:16], ad[15:0]) : 128'd0);
    // Word k - 1 of the weight block (in mem_q) against its activation values.
    wire signed [20:0] mac = cfg_q4 ? dot8n(mem_q, abm[ao + 2*(k-1)], abm[ao + 2*(k-1) + 1]) : dot4(mem_q, abm[ao + k-1]);
    wire again = cfg_t2 && !tt;      // the block's second term follows: read the block again
    wire last_row = row + 1'b1 == cfg_rows;
    // The row's total: the partial sum from the west (0 first in the mesh row) plus its own.
    wire [127:0] own = cfg_blocks == 0 ? 128'd0 : acc[row];
    wire [127:0] total = sum + own;

    always @* begin
        rx_ready = 0;
        rx_ready[0] = state != S_IDLE && state != S_DONE && ar < act_words;
        rx_ready[1] = state == S_RX;
        tx_valid = state == S_TX;
        tx_colour = cfg_last ? 2'd2 : 2'd1;
        tx_data = cfg_last ? acc_to_f32(total) : total[k*32 +: 32];
        rd_addr = (k == bw) ? (again ? row_addr : row_addr + stride) : row_addr + k;
    end

    always @(posedge clk) begin
        if (ld_we)
            mem[ld_addr] <= ld_data;
        mem_q <= mem[rd_addr];
    end

    always @(posedge clk) begin
        if (rst) begin
            state <= S_IDLE;
            done <= 1'b0;
            stat_mac <= 0;
            stat_cycles <= 0;
        end else if (go) begin
            state <= cfg_rows == 0 ? S_DONE : (cfg_blocks == 0 ? (cfg_first ? S_TX : S_RX) : S_ACT);
            done <= 1'b0;
            k <= 0;
            ar <= 0;
            aw <= 0;
            arb <= 0;
            abase <= 0;
            bt0 <= 0;
            tt <= 1'b0;
            row <= 0;
            blk <= 0;
            row_addr <= 0;
            stride <= cfg_blocks * bw;
            sum <= 0;
            stat_mac <= 0;
            stat_cycles <= 0;
        end else begin
            if (state != S_IDLE && state != S_DONE)
                stat_cycles <= stat_cycles + 1;
            if (act_in) begin
                abm[ar[ACT_AW-1:0]] <= rx_data;
                ar <= ar + 1'b1;
                if (aw < 8)
                    asr <= (aw == 0 ? 21'sd0 : asr) + sum4;
                if (aw == 7)
                    abs[arb] <= asr + sum4;
                if (aw == 8) begin
                    aw <= 0;
                    arb <= arb + 1'b1;
                end else begin
                    aw <= aw + 1'b1;
                end
            end
            case (state)
                S_ACT: if (blk_in) begin
                    k <= 0;
                    row <= 0;
                    tt <= 1'b0;
                    state <= S_MAC;
                end
                S_MAC: begin
                    // Cycle k reads word k; mem_q holds word k-1.
                    if (k >= 1 && k < bw) begin
                        psum <= (k == 1 ? 21'sd0 : psum) + mac;
                        stat_mac <= stat_mac + 1;
                    end
                    if (k == bw) begin
                        // mem_q is the weight block's scale: the row's term is complete.
                        acc[row] <= (blk == 0 && !tt ? 128'd0 : acc[row]) + term;
                        if (again) begin
                            // The same row and block against the second term; word 0 was
                            // read this cycle.
                            k <= 1;
                            tt <= 1'b1;
                        end else if (last_row) begin
                            tt <= 1'b0;
                            k <= 0;
                            row <= 0;
                            blk <= blk + 1'b1;
                            row_addr <= (blk + 1'b1) * bw;
                            abase <= abase + wpb;
                            bt0 <= bt0 + (cfg_t2 ? 2'd2 : 2'd1);
                            if (blk + 1'b1 == cfg_blocks)
                                state <= cfg_first ? S_TX : S_RX;
                            else
                                state <= S_ACT;
                            sum <= 0;
                        end else begin
                            // The next row's word 0 was read this cycle.
                            k <= 1;
                            tt <= 1'b0;
                            row <= row + 1'b1;
                            row_addr <= row_addr + stride;
                        end
                    end else begin
                        k <= k + 1'b1;
                    end
                end
                S_RX: if (part_in) begin
                    sum[k*32 +: 32] <= rx_data;
                    if (k == 3) begin
                        k <= 0;
                        state <= S_TX;
                    end else begin
                        k <= k + 1'b1;
                    end
                end
                S_TX: begin
                    if (tx_fire) begin
                        if (cfg_last || k == 3) begin
                            k <= 0;
                            if (last_row) begin
                                state <= S_DONE;
                            end else begin
                                row <= row + 1'b1;
                                state <= cfg_first ? S_TX : S_RX;
                            end
                        end else begin
                            k <= k + 1'b1;
                        end
                    end
                end
                S_DONE: done <= 1'b1;
                default: ;
            endcase
        end
    end
endmodule
