// FIFO bench: random pushes and pops against a reference queue; checks order, full and empty.
`timescale 1ns/1ps
module tb_fifo;
    reg clk = 0;
    always #1 clk = ~clk;
    reg rst = 1;
    reg in_valid = 0, out_ready = 0;
    reg [31:0] in_data = 0;
    wire in_ready, out_valid;
    wire [31:0] out_data;
    flint_fifo #(.W(32), .DEPTH_LOG2(2)) dut (
        .clk(clk), .rst(rst), .in_valid(in_valid), .in_ready(in_ready), .in_data(in_data),
        .out_valid(out_valid), .out_ready(out_ready), .out_data(out_data)
    );
    reg [31:0] model [0:1023];
    integer head = 0, tail = 0, n, errors = 0, seed = 7, pushed = 0, popped = 0;
    initial begin
        repeat (3) @(posedge clk);
        rst = 0;
        for (n = 0; n < 20000; n = n + 1) begin
            @(negedge clk);
            in_valid = $random(seed) & 1;
            in_data = $random(seed);
            out_ready = ($random(seed) % 3) != 0;
            // Expected flags from the model.
            if (in_ready !== (tail - head < 4)) begin errors = errors + 1; $display("FAIL: in_ready %b with %0d queued", in_ready, tail - head); end
            if (out_valid !== (tail != head)) begin errors = errors + 1; $display("FAIL: out_valid %b with %0d queued", out_valid, tail - head); end
            if (out_valid && out_data !== model[head % 1024]) begin errors = errors + 1; $display("FAIL: head %h, expected %h", out_data, model[head % 1024]); end
            @(posedge clk);
            if (out_valid && out_ready) begin head = head + 1; popped = popped + 1; end
            if (in_valid && in_ready) begin model[tail % 1024] = in_data; tail = tail + 1; pushed = pushed + 1; end
        end
        $display("fifo: %0d pushed, %0d popped", pushed, popped);
        if (errors == 0 && popped > 5000) $display("PASS"); else $display("FAIL: %0d errors", errors);
        $finish;
    end
endmodule
