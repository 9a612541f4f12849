// A GEMV region of the layer: an R x C mesh (flint_mesh.v) with its edges joined to the
// layer's streams. The north edge takes one 8-bit vector, block by block (a block's terms one
// after the other), and hands each block to the mesh column that holds it: column c takes
// blocks [colend[c-1], colend[c]). The east edge gives the results back in row order: each
// mesh row's results go to their place in an output buffer as they come (all mesh rows
// reduce at once), and leave it in order. The tiling (which
// rows and blocks each PE holds) is the host's choice, written with the weights.
//
// Load bus: ld_pe is the PE (r * C + c). Configuration: cfg_pe 16'hffff addresses the region's
// own registers (sel 0: words a block, 9 * terms; sel 1: {column, colend}; sel 2: {row,
// rowcnt}, rows in order); any other cfg_pe goes to that PE (flint_pe.v).
module flint_region #(
    parameter R = 2,
    parameter C = 2,
    parameter NC = 3,
    parameter MEM_AW = 12,
    parameter ROWS_AW = 6,
    parameter OAW = 11  // the output buffer: 2^OAW values
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
    input  wire              in_valid,
    output wire              in_ready,
    input  wire [31:0]       in_data,
    output wire              out_valid,
    input  wire              out_ready,
    output wire [31:0]       out_data,
    output wire              done,
    output wire [31:0]       stat_cycles,
    output wire [31:0]       stat_mac
);
    wire own = cfg_we && cfg_pe == 16'hffff;
    reg [4:0] wpb;
    reg [15:0] colend [0:C-1];
    reg [15:0] rowcnt [0:R-1];
    always @(posedge clk) begin
        if (rst)
            wpb <= 5'd9;
        else if (own) begin
            case (cfg_sel)
                4'd0: wpb <= cfg_data[4:0];
                4'd1: colend[cfg_data[31:16]] <= cfg_data[15:0];
                4'd2: rowcnt[cfg_data[31:16]] <= cfg_data[15:0];
                default: ;
            endcase
        end
    end

    // North edge: the column taking the current block, the block and its word.
    reg [15:0] col, blk;
    reg [4:0] w;
    wire [C*3-1:0] n_ready;
    wire [C-1:0] n_valid;
    genvar gc;
    generate
        for (gc = 0; gc < C; gc = gc + 1) begin : g_n
            assign n_valid[gc] = in_valid && col == gc;
        end
    endgenerate
    assign in_ready = col < C && n_ready[col*NC];
    wire in_fire = in_valid && in_ready;
    always @(posedge clk) begin
        if (rst || go) begin
            col <= 0;
            blk <= 0;
            w <= 0;
        end else if (in_fire) begin
            if (w + 1'b1 == wpb) begin
                w <= 0;
                blk <= blk + 1'b1;
                if (blk + 1'b1 == colend[col])
                    col <= col + 1'b1;
            end else begin
                w <= w + 1'b1;
            end
        end
    end

    // East edge: every mesh row's results are taken as they come (the rows reduce in
    // parallel) into the output buffer at their place in the vector (row r's from rowbase[r]);
    // the buffer sends them on in order, each as soon as it and all before it are in.
    reg [15:0] rowbase [0:R-1];
    reg [15:0] got [0:R-1];
    reg [31:0] ob [0:(1<<OAW)-1];
    reg [(1<<OAW)-1:0] obv;
    reg [15:0] rp, total;
    wire [R-1:0] e_valid;
    wire [R*2-1:0] e_colour;
    wire [R*32-1:0] e_data;
    wire [R*NC-1:0] e_ready;
    genvar gr;
    generate
        for (gr = 0; gr < R; gr = gr + 1) begin : g_e
            // Results are colour 2; the east edge takes nothing else.
            assign e_ready[gr*NC +: NC] = {got[gr] != rowcnt[gr], 2'b00};
        end
    endgenerate
    assign out_valid = rp != total && obv[rp[OAW-1:0]];
    assign out_data = ob[rp[OAW-1:0]];
    integer i;
    always @(posedge clk) begin
        if (own && cfg_sel == 4'd2) begin
            // Rows arrive in order: each one's base is the count before it.
            rowbase[cfg_data[31:16]] <= cfg_data[31:16] == 0 ? 16'd0 : total;
            total <= (cfg_data[31:16] == 0 ? 16'd0 : total) + cfg_data[15:0];
        end
        if (rst || go) begin
            rp <= 0;
            obv <= 0;
            for (i = 0; i < R; i = i + 1) got[i] <= 0;
        end else begin
            for (i = 0; i < R; i = i + 1)
                if (e_valid[i] && got[i] != rowcnt[i]) begin
                    ob[rowbase[i] + got[i]] <= e_data[i*32 +: 32];
                    obv[rowbase[i] + got[i]] <= 1'b1;
                    got[i] <= got[i] + 1'b1;
                end
            if (out_valid && out_ready)
                rp <= rp + 1'b1;
        end
    end

    wire [31:0] tot_stall;
    wire [NC*32-1:0] tot_xfer;
    flint_mesh #(.R(R), .C(C), .NC(NC), .MEM_AW(MEM_AW), .ROWS_AW(ROWS_AW)) mesh (
        .clk(clk), .rst(rst), .go(go),
        .ld_we(ld_we), .ld_pe(ld_pe), .ld_addr(ld_addr), .ld_data(ld_data),
        .cfg_we(cfg_we && !own), .cfg_pe(cfg_pe), .cfg_sel(cfg_sel), .cfg_data(cfg_data),
        .n_valid(n_valid), .n_colour({C{2'd0}}), .n_data({C{in_data}}), .n_ready(n_ready),
        .e_valid(e_valid), .e_colour(e_colour), .e_data(e_data), .e_ready(e_ready),
        .done(done), .tot_mac(stat_mac), .tot_cycles(stat_cycles), .tot_xfer(tot_xfer), .tot_stall(tot_stall)
    );
endmodule
