// Five-port router (0 north, 1 east, 2 south, 3 west, 4 local) with NC colours (virtual
// channels). A link carries valid, a 2-bit colour and 32 data bits forward, and one ready bit
// per colour back: each input port buffers each colour in its own FIFO, so a stalled colour
// never blocks another. Routes are configured at load time per colour and input port as a
// mask of output ports; a mask with several bits multicasts (the flit leaves its FIFO once
// every output in the mask took it). Each output port arbitrates round-robin among the
// (input, colour) heads that want it and whose colour the downstream side can take.
module flint_router #(
    parameter NC = 3,
    parameter DEPTH_LOG2 = 2
) (
    input  wire             clk,
    input  wire             rst,
    // cfg_route[(c*5 + in)*5 +: 5]: output mask for colour c arriving on port `in`.
    input  wire [NC*25-1:0] cfg_route,
    input  wire [4:0]       in_valid,
    input  wire [9:0]       in_colour,
    input  wire [159:0]     in_data,
    output wire [5*NC-1:0]  in_ready,
    output reg  [4:0]       out_valid,
    output reg  [9:0]       out_colour,
    output reg  [159:0]     out_data,
    input  wire [5*NC-1:0]  out_ready,
    // Statistics: flits sent per output port and colour, and cycles an output had a flit
    // waiting for it that the downstream side could not take.
    output reg  [5*NC*32-1:0] stat_xfer,
    output reg  [5*32-1:0]    stat_stall
);
    localparam NS = 5 * NC; // sources: (input port, colour), index in*NC + c

    wire [NS-1:0]    hv;    // head valid
    wire [NS*32-1:0] hd;    // head data
    reg  [NS*5-1:0]  sent;  // outputs that already took the current head
    wire [NS*5-1:0]  route;
    reg  [NS-1:0]    pop;

    genvar gp, gc;
    generate
        for (gp = 0; gp < 5; gp = gp + 1) begin : g_in
            for (gc = 0; gc < NC; gc = gc + 1) begin : g_col
                localparam S = gp * NC + gc;
                assign route[S*5 +: 5] = cfg_route[(gc*5 + gp)*5 +: 5];
                flint_fifo #(.W(32), .DEPTH_LOG2(DEPTH_LOG2)) fifo (
                    .clk(clk), .rst(rst),
                    .in_valid(in_valid[gp] && in_colour[gp*2 +: 2] == gc),
                    .in_ready(in_ready[S]),
                    .in_data(in_data[gp*32 +: 32]),
                    .out_valid(hv[S]),
                    .out_ready(pop[S]),
                    .out_data(hd[S*32 +: 32])
                );
            end
        end
    endgenerate

    // Arbitration, per output: the first requesting source after the one granted last
    // (round-robin), found with a thermometer mask and a lowest-set-bit pick.
    reg  [5*4-1:0]  ptr;
    wire [NS*5-1:0] served;  // served[s*5 + o]: output o takes source s's head this cycle
    wire [4:0]      blocked; // a head wants the output but its colour cannot go downstream
    wire [4:0]      gany;
    wire [5*4-1:0]  gsrc;
    genvar go, gs;
    generate
        for (go = 0; go < 5; go = go + 1) begin : g_out
            wire [NS-1:0] want, req, onehot;
            for (gs = 0; gs < NS; gs = gs + 1) begin : g_req
                assign want[gs] = hv[gs] && route[gs*5 + go] && !sent[gs*5 + go];
                assign req[gs] = want[gs] && out_ready[go*NC + gs % NC];
                assign served[gs*5 + go] = onehot[gs];
            end
            wire [NS-1:0] above = req & ~(({{(NS-1){1'b0}}, 1'b1} << ptr[go*4 +: 4] << 1) - 1'b1);
            wire [NS-1:0] pick = (|above) ? above : req;
            assign onehot = pick & (~pick + 1'b1);
            reg [3:0] idx;
            reg [1:0] col;
            reg [31:0] data;
            integer j;
            always @* begin
                idx = 0;
                col = 0;
                data = 0;
                for (j = 0; j < NS; j = j + 1)
                    if (onehot[j]) begin
                        idx = j;
                        col = j % NC;
                        data = data | hd[j*32 +: 32];
                    end
                out_valid[go] = |req;
                out_colour[go*2 +: 2] = col;
                out_data[go*32 +: 32] = data;
            end
            assign gany[go] = |req;
            assign gsrc[go*4 +: 4] = idx;
            assign blocked[go] = |want && !(|req);
        end
    endgenerate

    integer s, o;
    always @* begin
        for (s = 0; s < NS; s = s + 1)
            // Done with a head when every output of its route took it (an empty route drops it).
            pop[s] = hv[s] && (((sent[s*5 +: 5] | served[s*5 +: 5]) & route[s*5 +: 5]) == route[s*5 +: 5]);
    end

    integer q;
    always @(posedge clk) begin
        if (rst) begin
            sent <= 0;
            ptr <= 0;
            stat_xfer <= 0;
            stat_stall <= 0;
        end else begin
            for (s = 0; s < NS; s = s + 1)
                sent[s*5 +: 5] <= pop[s] ? 5'b0 : (sent[s*5 +: 5] | served[s*5 +: 5]);
            for (o = 0; o < 5; o = o + 1) begin
                if (gany[o]) begin
                    ptr[o*4 +: 4] <= gsrc[o*4 +: 4];
                    for (q = 0; q < NC; q = q + 1)
                        if (out_colour[o*2 +: 2] == q)
                            stat_xfer[(o*NC + q)*32 +: 32] <= stat_xfer[(o*NC + q)*32 +: 32] + 1;
                end
                if (blocked[o])
                    stat_stall[o*32 +: 32] <= stat_stall[o*32 +: 32] + 1;
            end
        end
    end
endmodule
