// Router bench: random flits on all five inputs in all three colours, random routes per
// (colour, input) including multicast, random input stalls and random per-colour
// backpressure on every output. Every flit must reach exactly the outputs of its route, in
// order per (input, colour), with its colour, and none may be lost or duplicated.
`timescale 1ns/1ps
module tb_router;
    localparam NC = 3, PER = 400; // flits per (input, colour)
    reg clk = 0;
    always #1 clk = ~clk;
    reg rst = 1;
    reg [NC*25-1:0] route;
    reg [4:0] in_valid = 0;
    reg [9:0] in_colour = 0;
    reg [159:0] in_data = 0;
    wire [5*NC-1:0] in_ready;
    wire [4:0] out_valid;
    wire [9:0] out_colour;
    wire [159:0] out_data;
    reg [5*NC-1:0] out_ready = 0;
    wire [5*NC*32-1:0] stat_xfer;
    wire [5*32-1:0] stat_stall;
    flint_router #(.NC(NC)) dut (
        .clk(clk), .rst(rst), .cfg_route(route),
        .in_valid(in_valid), .in_colour(in_colour), .in_data(in_data), .in_ready(in_ready),
        .out_valid(out_valid), .out_colour(out_colour), .out_data(out_data), .out_ready(out_ready),
        .stat_xfer(stat_xfer), .stat_stall(stat_stall)
    );

    integer seed = 11, errors = 0, cyc = 0, p, c, o, s;
    integer sent [0:14];          // per source (input p, colour c): next sequence number
    integer cur_c [0:4];          // colour each input is presenting
    integer expect_seq [0:74];    // per (output, source)
    integer received = 0, wanted = 0;
    reg [4:0] m;
    initial begin
        for (c = 0; c < NC; c = c + 1)
            for (p = 0; p < 5; p = p + 1) begin
                m = $random(seed);
                if (m == 0) m = 5'b00001 << p; // every route goes somewhere (a flit may return)
                route[(c*5 + p)*5 +: 5] = m;
                wanted = wanted + PER * ((m[0] ? 1 : 0) + (m[1] ? 1 : 0) + (m[2] ? 1 : 0) + (m[3] ? 1 : 0) + (m[4] ? 1 : 0));
            end
        for (s = 0; s < 15; s = s + 1) sent[s] = 0;
        for (s = 0; s < 75; s = s + 1) expect_seq[s] = 0;
        for (p = 0; p < 5; p = p + 1) cur_c[p] = p % NC;
        repeat (3) @(posedge clk);
        rst = 0;
    end

    // Drive: each input presents a flit of some colour that still has flits to send; it may
    // only change colour or data after the flit was taken (valid/ready protocol).
    reg [4:0] took = 0; // which inputs' flits the router took at the last rising edge
    always @(negedge clk) if (!rst) begin
        cyc = cyc + 1;
        for (p = 0; p < 5; p = p + 1) begin
            if (took[p]) begin
                sent[p*NC + cur_c[p]] = sent[p*NC + cur_c[p]] + 1;
                in_valid[p] = 0;
            end
            if (!in_valid[p]) begin
                c = $unsigned($random(seed)) % NC;
                if (sent[p*NC + c] < PER && ($random(seed) & 3) != 0) begin
                    in_valid[p] = 1;
                    in_colour[p*2 +: 2] = c;
                    in_data[p*32 +: 32] = {p[2:0], c[1:0], sent[p*NC + c][26:0]};
                    cur_c[p] = c;
                end
            end
        end
        for (s = 0; s < 5 * NC; s = s + 1)
            out_ready[s] = ($unsigned($random(seed)) % 4) != 0;
    end

    reg [2:0] fp;
    reg [1:0] fc;
    reg [26:0] fs;
    always @(posedge clk) if (!rst) begin
        for (p = 0; p < 5; p = p + 1)
            took[p] <= in_valid[p] && in_ready[p*NC + cur_c[p]];
        for (o = 0; o < 5; o = o + 1)
            if (out_valid[o] && out_ready[o*NC + out_colour[o*2 +: 2]]) begin
                {fp, fc, fs} = out_data[o*32 +: 32];
                received = received + 1;
                if (fc != out_colour[o*2 +: 2] || !route[(fc*5 + fp)*5 + o] || fs != expect_seq[o*15 + fp*NC + fc]) begin
                    errors = errors + 1;
                    if (errors < 10)
                        $display("FAIL: output %0d got input %0d colour %0d seq %0d (link colour %0d, expected seq %0d, routed %b)",
                            o, fp, fc, fs, out_colour[o*2 +: 2], expect_seq[o*15 + fp*NC + fc], route[(fc*5 + fp)*5 + o]);
                end
                expect_seq[o*15 + fp*NC + fc] = fs + 1;
            end
        if (received == wanted || cyc > 200000) begin
            if (received != wanted) begin
                errors = errors + 1;
                $display("FAIL: %0d of %0d flit deliveries arrived", received, wanted);
            end
            $display("router: %0d deliveries (multicast included) in %0d cycles", received, cyc);
            if (errors == 0) $display("PASS"); else $display("FAIL: %0d errors", errors);
            $finish;
        end
    end
endmodule
