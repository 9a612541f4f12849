// A processing element: router plus compute unit, joined at the router's local port, and the
// load-time configuration registers (routes, tile shape, position flags).
module flint_pe #(
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
    // Configuration: sel 0 rows, 1 blocks, 2 flags (bit 0 first, bit 1 last, bit 2 Q4_1
    // weights, bit 3 two activation terms), 3 + c: the
    // 25-bit route of colour c (input port p's output mask in bits 5p..5p+4).
    input  wire              cfg_we,
    input  wire [3:0]        cfg_sel,
    input  wire [31:0]       cfg_data,
    // Mesh links, ports N, E, S, W (router ports 0-3).
    input  wire [3:0]        in_valid,
    input  wire [7:0]        in_colour,
    input  wire [127:0]      in_data,
    output wire [4*NC-1:0]   in_ready,
    output wire [3:0]        out_valid,
    output wire [7:0]        out_colour,
    output wire [127:0]      out_data,
    input  wire [4*NC-1:0]   out_ready,
    output wire              done,
    output wire [31:0]       stat_mac,
    output wire [31:0]       stat_cycles,
    output wire [4*NC*32-1:0] stat_xfer,   // flits sent on N, E, S, W per colour
    output wire [4*32-1:0]   stat_stall
);
    reg [ROWS_AW:0] rows;
    reg [15:0] blocks;
    reg first, last, q4, t2;
    reg [NC*25-1:0] route;
    always @(posedge clk) begin
        if (rst) begin
            rows <= 0;
            blocks <= 0;
            first <= 1'b1;
            last <= 1'b1;
            q4 <= 1'b0;
            t2 <= 1'b0;
            route <= 0;
        end else if (cfg_we) begin
            case (cfg_sel)
                4'd0: rows <= cfg_data[ROWS_AW:0];
                4'd1: blocks <= cfg_data[15:0];
                4'd2: {t2, q4, last, first} <= cfg_data[3:0];
                default: if (cfg_sel - 3 < NC) route[(cfg_sel-3)*25 +: 25] <= cfg_data[24:0];
            endcase
        end
    end

    wire rx_valid, tx_valid;
    wire [1:0] rx_colour, tx_colour;
    wire [31:0] rx_data, tx_data;
    wire [NC-1:0] rx_ready, tx_ready;
    wire [5*NC*32-1:0] xfer;
    wire [5*32-1:0] stall;

    flint_router #(.NC(NC)) router (
        .clk(clk), .rst(rst), .cfg_route(route),
        .in_valid({tx_valid, in_valid}),
        .in_colour({tx_colour, in_colour}),
        .in_data({tx_data, in_data}),
        .in_ready({tx_ready, in_ready}),
        .out_valid({rx_valid, out_valid}),
        .out_colour({rx_colour, out_colour}),
        .out_data({rx_data, out_data}),
        .out_ready({rx_ready, out_ready}),
        .stat_xfer(xfer),
        .stat_stall(stall)
    );
    assign stat_xfer = xfer[4*NC*32-1:0];
    assign stat_stall = stall[4*32-1:0];

    flint_pe_core #(.NC(NC), .MEM_AW(MEM_AW), .ROWS_AW(ROWS_AW), .ACT_AW(ACT_AW)) core (
        .clk(clk), .rst(rst), .go(go),
        .ld_we(ld_we), .ld_addr(ld_addr), .ld_data(ld_data),
        .cfg_rows(rows), .cfg_blocks(blocks), .cfg_first(first), .cfg_last(last), .cfg_q4(q4), .cfg_t2(t2),
        .rx_valid(rx_valid), .rx_colour(rx_colour), .rx_data(rx_data), .rx_ready(rx_ready),
        .tx_valid(tx_valid), .tx_colour(tx_colour), .tx_data(tx_data), .tx_ready(tx_ready),
        .done(done), .stat_mac(stat_mac), .stat_cycles(stat_cycles)
    );
endmodule
