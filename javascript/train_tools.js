// Train Tools: the WebUI's own progress bar for a training run (the textual-inversion tab's pattern),
// plus a refresh of the loss plot and the file list every few seconds while it runs.

function train_tools_start() {
    var id = randomId();
    var lastRefresh = 0;
    var refresh = function() {
        var button = gradioApp().getElementById('train_tools_refresh');
        if (button) button.click();
    };
    // #train_tools_progress belongs to this script, never to a gradio event: writing into an element that a
    // gradio event updates would detach the element gradio renders into.
    requestProgress(id, gradioApp().getElementById('train_tools_progress'), null, refresh, function(progress) {
        gradioApp().getElementById('train_tools_progress').innerHTML = progress.textinfo || '';
        var now = Date.now();
        if (now - lastRefresh > 3000) {
            lastRefresh = now;
            refresh();
        }
    });

    var res = Array.from(arguments);
    res[0] = id;
    return res;
}
