// An R x C mesh of PEs. Activations enter at the top of each column (north edge, colour 0)
// and are multicast down it; partial sums flow east along each row (colour 1); results
// leave at the east edge (colour 2). Weights and routes are written through the load bus
// before a run (`ld_pe`, `cfg_pe`: PE index r * C + c); `go` starts a GEMV.
module flint_mesh #(
    parameter R = 2,
    parameter C = 2,
    parameter NC = 3,
    parameter MEM_AW = 12,
    parameter ROWS_AW = 6,
    parameter ACT_AW = 9
) (
    input  wire              clk,
    input  wire              rst,
    input  wire              go,
    input  wire              ld_we,
    input  wire [15:0]       ld_pe,
    input  wire [MEM_AW-1:0] ld_addr,
    input  wire [31:0]       ld_data,
    input  wire              cfg_we,
    input  wire [15:0]       cfg_pe,
    input  wire [3:0]        cfg_sel,
    input  wire [31:0]       cfg_data,
    // North edge: one input link per column.
    input  wire [C-1:0]      n_valid,
    input  wire [C*2-1:0]    n_colour,
    input  wire [C*32-1:0]   n_data,
    output wire [C*NC-1:0]   n_ready,
    // East edge: one output link per row.
    output wire [R-1:0]      e_valid,
    output wire [R*2-1:0]    e_colour,
    output wire [R*32-1:0]   e_data,
    input  wire [R*NC-1:0]   e_ready,
    output wire              done,
    // Totals over the mesh: MAC cycles, busy cycles, flits per colour on the mesh's links
    // (inter-PE and edge), cycles an output port was stalled by the downstream side.
    output reg  [31:0]       tot_mac,
    output reg  [31:0]       tot_cycles,
    output reg  [NC*32-1:0]  tot_xfer,
    output reg  [31:0]       tot_stall
);
    localparam N = R * C;
    wire [N*4-1:0]     iv, ov;
    wire [N*8-1:0]     ic, oc;
    wire [N*128-1:0]   id, od;
    wire [N*4*NC-1:0]  ir, orr;
    wire [N-1:0]       pdone;
    wire [N*32-1:0]    smac, scyc;
    wire [N*4*NC*32-1:0] sxfer;
    wire [N*4*32-1:0]  sstall;

    genvar r, c;
    generate
        for (r = 0; r < R; r = r + 1) begin : g_r
            for (c = 0; c < C; c = c + 1) begin : g_c
                localparam I = r * C + c;
                // Inputs: N from above (or the edge), E from the right, S from below, W from the left.
                if (r == 0) begin : g_n_edge
                    assign iv[I*4 + 0] = n_valid[c];
                    assign ic[I*8 + 0 +: 2] = n_colour[c*2 +: 2];
                    assign id[I*128 + 0 +: 32] = n_data[c*32 +: 32];
                    assign n_ready[c*NC +: NC] = ir[(I*4 + 0)*NC +: NC];
                end else begin : g_n
                    assign iv[I*4 + 0] = ov[(I-C)*4 + 2];
                    assign ic[I*8 + 0 +: 2] = oc[(I-C)*8 + 4 +: 2];
                    assign id[I*128 + 0 +: 32] = od[(I-C)*128 + 64 +: 32];
                end
                if (c == C - 1) begin : g_e_edge
                    assign iv[I*4 + 1] = 1'b0;
                    assign ic[I*8 + 2 +: 2] = 2'd0;
                    assign id[I*128 + 32 +: 32] = 32'd0;
                    assign e_valid[r] = ov[I*4 + 1];
                    assign e_colour[r*2 +: 2] = oc[I*8 + 2 +: 2];
                    assign e_data[r*32 +: 32] = od[I*128 + 32 +: 32];
                    assign orr[(I*4 + 1)*NC +: NC] = e_ready[r*NC +: NC];
                end else begin : g_e
                    assign iv[I*4 + 1] = ov[(I+1)*4 + 3];
                    assign ic[I*8 + 2 +: 2] = oc[(I+1)*8 + 6 +: 2];
                    assign id[I*128 + 32 +: 32] = od[(I+1)*128 + 96 +: 32];
                    assign orr[(I*4 + 1)*NC +: NC] = ir[((I+1)*4 + 3)*NC +: NC];
                end
                if (r == R - 1) begin : g_s_edge
                    assign iv[I*4 + 2] = 1'b0;
                    assign ic[I*8 + 4 +: 2] = 2'd0;
                    assign id[I*128 + 64 +: 32] = 32'd0;
                    assign orr[(I*4 + 2)*NC +: NC] = {NC{1'b1}};
                end else begin : g_s
                    assign iv[I*4 + 2] = ov[(I+C)*4 + 0];
                    assign ic[I*8 + 4 +: 2] = oc[(I+C)*8 + 0 +: 2];
                    assign id[I*128 + 64 +: 32] = od[(I+C)*128 + 0 +: 32];
                    assign orr[(I*4 + 2)*NC +: NC] = ir[((I+C)*4 + 0)*NC +: NC];
                end
                if (c == 0) begin : g_w_edge
                    assign iv[I*4 + 3] = 1'b0;
                    assign ic[I*8 + 6 +: 2] = 2'd0;
                    assign id[I*128 + 96 +: 32] = 32'd0;
                    assign orr[(I*4 + 3)*NC +: NC] = {NC{1'b1}};
                end else begin : g_w
                    assign iv[I*4 + 3] = ov[(I-1)*4 + 1];
                    assign ic[I*8 + 6 +: 2] = oc[(I-1)*8 + 2 +: 2];
                    assign id[I*128 + 96 +: 32] = od[(I-1)*128 + 32 +: 32];
                    assign orr[(I*4 + 3)*NC +: NC] = ir[((I-1)*4 + 1)*NC +: NC];
                end
                if (r == 0) begin : g_n_out_edge
                    assign orr[(I*4 + 0)*NC +: NC] = {NC{1'b1}};
                end else begin : g_n_out
                    assign orr[(I*4 + 0)*NC +: NC] = ir[((I-C)*4 + 2)*NC +: NC];
                end

                flint_pe #(.NC(NC), .MEM_AW(MEM_AW), .ROWS_AW(ROWS_AW), .ACT_AW(ACT_AW)) pe (
                    .clk(clk), .rst(rst), .go(go),
                    .ld_we(ld_we && ld_pe == I), .ld_addr(ld_addr), .ld_data(ld_data),
                    .cfg_we(cfg_we && cfg_pe == I), .cfg_sel(cfg_sel), .cfg_data(cfg_data),
                    .in_valid(iv[I*4 +: 4]), .in_colour(ic[I*8 +: 8]), .in_data(id[I*128 +: 128]),
                    .in_ready(ir[I*4*NC +: 4*NC]),
                    .out_valid(ov[I*4 +: 4]), .out_colour(oc[I*8 +: 8]), .out_data(od[I*128 +: 128]),
                    .out_ready(orr[I*4*NC +: 4*NC]),
                    .done(pdone[I]), .stat_mac(smac[I*32 +: 32]), .stat_cycles(scyc[I*32 +: 32]),
                    .stat_xfer(sxfer[I*4*NC*32 +: 4*NC*32]), .stat_stall(sstall[I*4*32 +: 4*32])
                );
            end
        end
    endgenerate

    assign done = &pdone;

    integer i, p, k;
    always @* begin
        tot_mac = 0;
        tot_cycles = 0;
        tot_xfer = 0;
        tot_stall = 0;
        for (i = 0; i < N; i = i + 1) begin
            tot_mac = tot_mac + smac[i*32 +: 32];
            if (scyc[i*32 +: 32] > tot_cycles)
                tot_cycles = scyc[i*32 +: 32];
            for (p = 0; p < 4; p = p + 1) begin
                tot_stall = tot_stall + sstall[(i*4 + p)*32 +: 32];
                for (k = 0; k < NC; k = k + 1)
                    tot_xfer[k*32 +: 32] = tot_xfer[k*32 +: 32] + sxfer[((i*4 + p)*NC + k)*32 +: 32];
            end
        end
    end
endmodule
