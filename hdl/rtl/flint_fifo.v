// Synchronous FIFO with valid/ready on both sides. DEPTH = 2^DEPTH_LOG2 entries.
module flint_fifo #(
    parameter W = 32,
    parameter DEPTH_LOG2 = 2
) (
    input  wire         clk,
    input  wire         rst,
    input  wire         in_valid,
    output wire         in_ready,
    input  wire [W-1:0] in_data,
    output wire         out_valid,
    input  wire         out_ready,
    output wire [W-1:0] out_data
);
    localparam DEPTH = 1 << DEPTH_LOG2;
    reg [W-1:0] mem [0:DEPTH-1];
    reg [DEPTH_LOG2:0] rd, wr;
    wire empty = rd == wr;
    // The count in the pointers' own width, so it wraps with them.
    wire [DEPTH_LOG2:0] count = wr - rd;
    wire full = count == DEPTH;
    assign in_ready = !full;
    assign out_valid = !empty;
    assign out_data = mem[rd[DEPTH_LOG2-1:0]];
    always @(posedge clk) begin
        if (rst) begin
            rd <= 0;
            wr <= 0;
        end else begin
            if (in_valid && !full) begin
                mem[wr[DEPTH_LOG2-1:0]] <= in_data;
                wr <= wr + 1'b1;
            end
            if (out_ready && !empty)
                rd <= rd + 1'b1;
        end
    end
endmodule
