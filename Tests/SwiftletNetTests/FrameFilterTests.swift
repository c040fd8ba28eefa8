import Testing
@testable import SwiftletNet

@Suite struct FrameFilterTests {
    @Test func verdictsCompareByTheirFrames() {
        #expect(FilterVerdict.reply([[1, 2]]) == .reply([[1, 2]]))
        #expect(FilterVerdict.reply([[1, 2]]) != .reply([[1, 3]]))
        #expect(FilterVerdict.pass != .drop)
    }
}
